"""Envoy's RBAC network filter, as istiod writes it for a TCP port, read into the engine's
authorization model (:mod:`metaprotocol_sdk.proxy.authorization`).

istiod compiles each AuthorizationPolicy rule into an RBAC ``Policy`` named
``ns[NS]-policy[NAME]-rule[I]`` of the filter of its action (DENY, ALLOW; AUDIT as ``LOG``;
dry-run ones in ``shadow_rules``). Each is read here as it is, a tree of Envoy's principal and
permission matchers (:class:`RbacRule`), judged against a connection's :class:`Facts` with
Envoy's semantics; the rules of one AuthorizationPolicy are grouped back into one
:class:`~metaprotocol_sdk.proxy.authorization.Policy` named ``NS/NAME``, as a policy read from
a file is, so the stats series are the same whichever way the policy came. A policy matches
if one of its rules does, as in Envoy, so grouping changes no decision.

Every field set is honoured, ignored for a reason docs/xds.md gives (statistics, audit
logs, enforcement timing), or refused (:class:`~.translate.XdsRefused`): a matcher the
engine cannot judge on a TCP connection (HTTP headers and paths, dynamic metadata, CEL) is
refused rather than guessed at, since a misread DENY rule lets traffic through.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import address_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf.message import DecodeError, Message

from ..authorization import Action, Authorization, Facts, IpNetwork, Policy, Rule, ascii_lower
from ..matcher import compile_regex

#: The typed config of Envoy's RBAC network filter.
NETWORK_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
#: istiod's name of an RBAC policy: one rule of one AuthorizationPolicy.
_ISTIO_NAME = re.compile(r"ns\[(?P<ns>[^\]]*)\]-policy\[(?P<name>[^\]]*)\]-rule\[\d+\]")

Refuse = Callable[[str, str], Exception]
#: The longest RBAC policy name read: above istiod's longest (a 63-character namespace, a
#: 253-character name, a rule's index). A name is a stats label and is written in the access
#: log line of each request it denies: a control plane's megabyte-long name made each
#: 30-byte denied request a megabyte of log.
MAX_POLICY_NAME = 512


class StringMatch:
    """Envoy's ``StringMatcher``: exact, prefix, suffix, contains or an RE2 full match;
    ``ignore_case`` for all but the regex, folding ASCII letters only (``absl``'s
    ``EqualsIgnoreCase``)."""

    __slots__ = ("ignore_case", "kind", "test", "value")

    def __init__(self, kind: str, value: str, ignore_case: bool) -> None:
        self.kind = kind
        self.ignore_case = ignore_case and kind != "safe_regex"
        self.value = ascii_lower(value) if self.ignore_case else value
        self.test: Callable[[str], bool] | None = (
            compile_regex(value) if kind == "safe_regex" else None
        )

    def matches(self, text: str) -> bool:
        """Whether ``text`` matches."""
        if self.test is not None:
            return self.test(text)
        if self.ignore_case:
            text = ascii_lower(text)
        if self.kind == "exact":
            return text == self.value
        if self.kind == "prefix":
            return text.startswith(self.value)
        if self.kind == "suffix":
            return text.endswith(self.value)
        return self.value in text  # contains


@dataclass(frozen=True)
class Node:
    """One matcher of a principal or permission tree: ``kind`` and what it needs."""

    kind: str
    children: tuple[Node, ...] = ()
    string: StringMatch | None = None
    network: IpNetwork | None = None
    low: int = 0
    high: int = 0


Test = Callable[[Facts], bool]


def _always(facts: Facts) -> bool:
    return True


def _never(facts: Facts) -> bool:
    return False


def _compiled(node: Node) -> Test:
    """The function judging ``node``."""
    kind = node.kind
    if kind == "any":
        return _always
    if kind in ("and", "or"):
        tests = tuple(_compiled(child) for child in node.children)
        if len(tests) == 1:
            return tests[0]
        if kind == "and":

            def every(facts: Facts) -> bool:
                for test in tests:  # noqa: SIM110 (a loop: no generator per call)
                    if not test(facts):
                        return False
                return True

            return every

        def some(facts: Facts) -> bool:
            for test in tests:  # noqa: SIM110
                if test(facts):
                    return True
            return False

        return some
    if kind == "not":
        inner = _compiled(node.children[0])
        return lambda facts: not inner(facts)
    if kind == "authenticated":
        name = node.string
        return lambda facts: _authenticated(name, facts)
    if kind in ("remote_ip", "destination_ip"):
        network = node.network
        attribute = "remote_ip" if kind == "remote_ip" else "destination_ip"
        return lambda facts: _in(network, getattr(facts, attribute))
    if kind == "destination_port":
        low, high = node.low, node.high
        return lambda facts: facts.port is not None and low <= facts.port < high
    string = node.string
    assert kind == "requested_server_name" and string is not None
    return lambda facts: string.matches(facts.sni or "")


def _in(network: IpNetwork | None, address: Any) -> bool:
    return (
        network is not None
        and address is not None
        and address.version == network.version
        and address in network
    )


def _authenticated(name: StringMatch | None, facts: Facts) -> bool:
    """Envoy's ``authenticated``: a TLS connection (any, without ``principal_name``) whose
    peer certificate has a URI SAN, else a DNS SAN, else a subject that matches."""
    if not facts.secure:
        return False
    if name is None:
        return True
    cert = facts.peercert if isinstance(facts.peercert, dict) else {}
    sans = cert.get("subjectAltName", ())
    for wanted in ("URI", "DNS"):
        for kind, value in sans:
            if kind == wanted and isinstance(value, str) and name.matches(value):
                return True
    return name.matches(subject_of(cert))


#: OpenSSL's short names of the attributes ``getpeercert()`` spells out by their long names
#: (RFC 2253 output); the others' short names are their long ones.
_SHORT = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "street",
    "domainComponent": "DC",
    "userId": "UID",
    "surname": "SN",
    "givenName": "GN",
    "uniqueIdentifier": "uid",
    "jurisdictionCountryName": "jurisdictionC",
    "jurisdictionStateOrProvinceName": "jurisdictionST",
    "jurisdictionLocalityName": "jurisdictionL",
}


def subject_of(cert: dict[str, Any]) -> str:
    """A certificate's subject as Envoy prints it (RFC 2253: last RDN first, ``,`` between
    them, ``+`` within one, special characters escaped)."""
    parts: list[str] = []
    for rdn in reversed(cert.get("subject", ())):
        names = []
        for pair in rdn:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                continue
            key, value = pair
            names.append(f"{_SHORT.get(key, key)}={_escaped(str(value))}")
        parts.append("+".join(names))
    return ",".join(parts)


def _escaped(value: str) -> str:
    """``value`` as OpenSSL's ``XN_FLAG_RFC2253`` prints it: UTF-8, each byte of a control
    character or above ASCII as ``\\XX``, RFC 2253's special characters after a backslash."""
    data = value.encode("utf-8", "surrogatepass")
    last = len(data) - 1
    out = []
    for i, byte in enumerate(data):
        char = chr(byte)
        if byte < 0x20 or byte >= 0x7F:
            out.append(f"\\{byte:02X}")
        elif char in ',+"\\<>;' or (char in " #" and i == 0) or (char == " " and i == last):
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


@dataclass(frozen=True)
class RbacRule(Rule):
    """One RBAC ``Policy``: one of ``permissions`` and one of ``principals`` match. ``permit``
    and ``admit`` judge them, made once from the trees: nested closures, with no dispatch on
    a node's kind per connection (over istiod's policies, 0.5 us per policy against 1.1 us
    walking the trees: ``tests/xds/bench_rbac.py``)."""

    permissions: tuple[Node, ...] = ()
    principals: tuple[Node, ...] = ()
    permit: Test = field(default=_never, compare=False, repr=False)
    admit: Test = field(default=_never, compare=False, repr=False)

    def connection_matches(self, facts: Facts) -> bool:
        """Whether the connection matches (RBAC rules read nothing of a request)."""
        return self.permit(facts) and self.admit(facts)


def rbac_rule(permissions: tuple[Node, ...], principals: tuple[Node, ...]) -> RbacRule:
    """An :class:`RbacRule` with its judging functions."""
    return RbacRule(
        permissions=permissions,
        principals=principals,
        permit=_compiled(Node("or", permissions)),
        admit=_compiled(Node("or", principals)),
    )


class _Reader:
    """Reads one resource's RBAC filters; ``refuse(path, reason)`` makes the NACK's error."""

    def __init__(self, refuse: Refuse) -> None:
        self.refuse = refuse

    def check(self, msg: Message, path: str, kind: str, honoured: Iterable[str]) -> None:
        allowed = set(honoured)
        for desc, _ in msg.ListFields():
            if desc.name not in allowed:
                raise self.refuse(
                    f"{path}.{desc.name}", f"not supported by this engine ({kind}.{desc.name})"
                )

    def string(self, m: string_pb2.StringMatcher, path: str) -> StringMatch:
        self.check(
            m,
            path,
            "StringMatcher",
            ("exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"),
        )
        kind = m.WhichOneof("match_pattern")
        if kind is None:
            raise self.refuse(path, "needs exact, prefix, suffix, contains or safe_regex")
        if kind == "safe_regex":
            self.check(m.safe_regex, f"{path}.safe_regex", "RegexMatcher", ("regex", "google_re2"))
            if not m.safe_regex.regex:
                raise self.refuse(
                    f"{path}.safe_regex.regex", "must not be empty (Envoy's validation)"
                )
            try:
                return StringMatch(kind, m.safe_regex.regex, False)
            except ValueError as exc:
                raise self.refuse(f"{path}.safe_regex.regex", str(exc)) from None
        if kind not in ("exact", "prefix", "suffix", "contains"):
            raise self.refuse(f"{path}.{kind}", "not supported by this engine")
        value = str(getattr(m, kind))
        if kind != "exact" and not value:
            raise self.refuse(f"{path}.{kind}", "must not be empty (Envoy's validation)")
        return StringMatch(kind, value, m.ignore_case)

    def cidr(self, c: address_pb2.CidrRange, path: str) -> IpNetwork:
        self.check(c, path, "CidrRange", ("address_prefix", "prefix_len"))
        if c.prefix_len.value > 128:
            raise self.refuse(f"{path}.prefix_len", "above 128 (Envoy's validation)")
        try:
            address = ipaddress.ip_address(c.address_prefix)
            # As Envoy's CidrRange: an unset prefix_len is 0 (every address of the family),
            # one above the address's bits is all of them.
            length = min(c.prefix_len.value, address.max_prefixlen)
            return ipaddress.ip_network(f"{address}/{length}", strict=False)
        except ValueError as exc:
            raise self.refuse(path, f"not an IP range: {exc}") from None

    def principal(self, p: rbac_pb2.Principal, path: str) -> Node:
        kind = p.WhichOneof("identifier")
        where = f"{path}.{kind}"
        if kind == "any":
            if not p.any:
                raise self.refuse(where, "must be true")
            return Node("any")
        if kind in ("and_ids", "or_ids"):
            ids = getattr(p, kind).ids
            if not ids:
                raise self.refuse(where, "needs at least one id (Envoy's validation)")
            children = tuple(self.principal(x, f"{where}.ids[{i}]") for i, x in enumerate(ids))
            return Node("and" if kind == "and_ids" else "or", children)
        if kind == "not_id":
            return Node("not", (self.principal(p.not_id, where),))
        if kind == "authenticated":
            self.check(p.authenticated, where, "Principal.Authenticated", ("principal_name",))
            name = None
            if p.authenticated.HasField("principal_name"):
                name = self.string(p.authenticated.principal_name, f"{where}.principal_name")
            return Node("authenticated", string=name)
        if kind in ("source_ip", "direct_remote_ip", "remote_ip"):
            # The engine reads no PROXY protocol header: all three are the peer's address.
            return Node("remote_ip", network=self.cidr(getattr(p, kind), where))
        if kind is None:
            raise self.refuse(path, "an empty Principal (Envoy's validation)")
        raise self.refuse(where, _UNJUDGED.get(kind, "not supported by this engine"))

    def permission(self, p: rbac_pb2.Permission, path: str) -> Node:
        kind = p.WhichOneof("rule")
        where = f"{path}.{kind}"
        if kind == "any":
            if not p.any:
                raise self.refuse(where, "must be true")
            return Node("any")
        if kind in ("and_rules", "or_rules"):
            rules = getattr(p, kind).rules
            if not rules:
                raise self.refuse(where, "needs at least one rule (Envoy's validation)")
            children = tuple(self.permission(x, f"{where}.rules[{i}]") for i, x in enumerate(rules))
            return Node("and" if kind == "and_rules" else "or", children)
        if kind == "not_rule":
            return Node("not", (self.permission(p.not_rule, where),))
        if kind == "destination_ip":
            return Node("destination_ip", network=self.cidr(p.destination_ip, where))
        if kind == "destination_port":
            if p.destination_port > 65535:
                raise self.refuse(where, "above 65535 (Envoy's validation)")
            return Node("destination_port", low=p.destination_port, high=p.destination_port + 1)
        if kind == "destination_port_range":
            r = p.destination_port_range
            self.check(r, where, "Int32Range", ("start", "end"))
            if not (0 <= r.start < r.end <= 65536):
                raise self.refuse(
                    where, "needs 0 <= start < end <= 65536 (Envoy refuses other ranges)"
                )
            return Node("destination_port", low=r.start, high=r.end)  # end excluded
        if kind == "requested_server_name":
            return Node("requested_server_name", string=self.string(p.requested_server_name, where))
        if kind is None:
            raise self.refuse(path, "an empty Permission (Envoy's validation)")
        raise self.refuse(where, _UNJUDGED.get(kind, "not supported by this engine"))

    def policy(self, p: rbac_pb2.Policy, path: str) -> RbacRule:
        self.check(p, path, "Policy", ("permissions", "principals"))
        if not p.permissions or not p.principals:
            raise self.refuse(path, "needs permissions and principals (Envoy's validation)")
        return rbac_rule(
            tuple(
                self.permission(x, f"{path}.permissions[{i}]") for i, x in enumerate(p.permissions)
            ),
            tuple(self.principal(x, f"{path}.principals[{i}]") for i, x in enumerate(p.principals)),
        )

    def rules(self, r: rbac_pb2.RBAC, path: str) -> tuple[Action, tuple[Policy, ...]]:
        """One RBAC's action and its policies, grouped by AuthorizationPolicy."""
        self.check(r, path, "RBAC", ("action", "policies", "audit_logging_options"))
        action = _ACTIONS.get(r.action)
        if action is None:
            raise self.refuse(f"{path}.action", "not supported by this engine")
        grouped: dict[str, list[Rule]] = {}
        for name in sorted(r.policies):  # Envoy judges them in name order
            if len(name) > MAX_POLICY_NAME:
                raise self.refuse(
                    f"{path}.policies",
                    f"a policy name of {len(name)} characters, above {MAX_POLICY_NAME} (istiod's "
                    "are ns[<namespace>]-policy[<name>]-rule[<n>]): each denial writes it in "
                    "the access log, each series of it in the stats",
                )
            rule = self.policy(r.policies[name], f"{path}.policies[{name!r}]")
            found = _ISTIO_NAME.fullmatch(name)
            label = f"{found['ns']}/{found['name']}" if found else name
            grouped.setdefault(label, []).append(rule)
        return action, tuple(
            Policy(label, action, tuple(rules)) for label, rules in grouped.items()
        )


_ACTIONS: dict[int, Action] = {
    rbac_pb2.RBAC.ALLOW: "ALLOW",
    rbac_pb2.RBAC.DENY: "DENY",
    rbac_pb2.RBAC.LOG: "AUDIT",
}

#: Why matchers that Envoy judges on HTTP requests or metadata are refused on a TCP port.
_UNJUDGED = {
    "header": "an HTTP header: istiod writes none for a TCP port (it drops an ALLOW rule with "
    "one, and the field from a DENY rule)",
    "url_path": "an HTTP path: istiod writes none for a TCP port",
    "metadata": "dynamic metadata of other Envoy filters, which this engine does not have",
    "sourced_metadata": "dynamic metadata of other Envoy filters, which this engine does not have",
    "filter_state": "filter state of other Envoy filters, which this engine does not have",
    "matcher": "an extension matcher",
    "uri_template": "an HTTP path",
    "custom": "an extension matcher",
}

#: A placeholder ALLOW policy for an ALLOW filter without policies: it allows nothing.
ALLOW_NOTHING = "(no ALLOW policy matches)"


@dataclass
class ChainPolicies:
    """What a filter chain's RBAC filters say, in the engine's model."""

    deny: list[Policy]
    allow: list[Policy]
    audit: list[Policy]
    dry_deny: list[Policy]
    dry_allow: list[Policy]
    allow_filters: int = 0

    def authorization(self) -> Authorization | None:
        """The chain's :class:`Authorization` (``None``: no RBAC filter judges anything)."""
        if not (self.deny or self.allow or self.audit or self.dry_deny or self.dry_allow):
            return None
        return Authorization(
            tuple(self.deny),
            tuple(self.allow),
            tuple(self.audit),
            tuple(self.dry_deny),
            tuple(self.dry_allow),
        )


def chain_policies(filters: Iterable[tuple[str, bytes]], refuse: Refuse) -> ChainPolicies:
    """Read the RBAC network filters among ``filters`` (``(path, typed_config bytes)`` of
    each, in chain order) into one :class:`ChainPolicies`.

    Two enforcing ALLOW filters would each have to allow a connection (a conjunction the
    engine's model has no place for; istiod writes one): refused."""
    out = ChainPolicies([], [], [], [], [])
    reader = _Reader(refuse)
    for path, raw in filters:
        config = network_rbac_pb2.RBAC()
        try:
            config.ParseFromString(raw)
        except DecodeError as exc:
            raise refuse(path, f"undecodable RBAC: {exc}") from None
        reader.check(
            config,
            path,
            "network RBAC",
            (
                "rules",
                "shadow_rules",
                "shadow_rules_stat_prefix",
                "stat_prefix",
                "enforcement_type",
                "delay_deny",
            ),
        )
        if config.HasField("rules"):
            action, policies = reader.rules(config.rules, f"{path}.rules")
            if action == "ALLOW":
                out.allow_filters += 1
                if out.allow_filters > 1:
                    raise refuse(
                        f"{path}.rules",
                        "a second enforcing ALLOW RBAC filter in one chain (a connection "
                        "would need both to allow it; istiod writes one)",
                    )
                out.allow.extend(policies or (Policy(ALLOW_NOTHING, "ALLOW", ()),))
            else:
                (out.deny if action == "DENY" else out.audit).extend(policies)
        if config.HasField("shadow_rules"):
            action, policies = reader.rules(config.shadow_rules, f"{path}.shadow_rules")
            if action == "AUDIT":
                continue  # AUDIT policies in dry run (istiod writes them): they only count
            if action == "DENY":
                out.dry_deny.extend(policies)
                continue
            if out.dry_allow:
                raise refuse(f"{path}.shadow_rules", "a second ALLOW shadow rule set in one chain")
            out.dry_allow.extend(policies or (Policy(ALLOW_NOTHING, "ALLOW", ()),))
    return out
