"""Istio's ``AuthorizationPolicy`` documents, read into an :class:`~..authorization.Authorization`.

The policies given are those that apply to this workload (see :mod:`.selection`: its
namespace's and the root namespace's, their ``selector`` matching its labels; all of them,
a ``selector`` taken as matching, when its namespace is not known). Rules are compiled as
Istio compiles them for a TCP (non-HTTP) port: an HTTP-only field (``methods``, ``paths``,
``hosts``, ``requestPrincipals``, ``request.auth.*``) makes an ALLOW rule match nothing, and
is ignored in a DENY or AUDIT rule (which then matches more), each cautioned once at load.
``request.headers[KEY]`` is not HTTP-only here: it reads the request's attribute ``KEY``.
The annotation ``istio.io/dry-run`` puts an ALLOW or DENY policy in dry run: judged and
counted, never enforced.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from .. import authorization as authz
from ..authorization import Action, Addresses, Authorization, Check, Matcher, Policy, Ports, Rule
from . import fields as schema
from .selection import label_map

if TYPE_CHECKING:
    from .loader import _Doc

#: ``when`` keys of the connection, and the fact each reads.
CONNECTION_KEYS = {
    "source.ip": "source_ip",
    "remote.ip": "remote_ip",
    "source.namespace": "namespace",
    "source.principal": "principal",
    "source.serviceAccount": "service_account",
    "destination.ip": "destination_ip",
    "destination.port": "port",
    "connection.sni": "sni",
}
HEADER_KEY = "request.headers"
#: ``when`` keys that need HTTP (JWT claims of a request).
HTTP_ONLY_KEYS = ("request.auth.",)
DRY_RUN = schema.DRY_RUN
#: The values of :data:`DRY_RUN` istiod reads (Go's ParseBool).
DRY_RUN_VALUES = {
    **dict.fromkeys(("true", "True", "TRUE", "t", "T", "1"), True),
    **dict.fromkeys(("false", "False", "FALSE", "f", "F", "0"), False),
}
HTTP_ONLY = (
    "an HTTP-only field: on a non-HTTP protocol Istio drops an ALLOW rule that has one (the "
    "rule matches nothing) and ignores it in a DENY or AUDIT rule (which then matches more); "
    "so does this engine"
)


def authorization_policies(docs: list[_Doc], scoped: bool = False) -> Authorization | None:
    """The policies of ``docs``, compiled (``None``: there are none); ``scoped``: they were
    selected for the workload (its namespace is known)."""
    if not docs:
        return None
    by_action: dict[str, list[Policy]] = {"ALLOW": [], "DENY": [], "AUDIT": []}
    dry_run: dict[str, list[Policy]] = {"ALLOW": [], "DENY": []}
    names: dict[str, _Doc] = {}
    for doc in docs:
        meta = doc.body.get("metadata") or {}
        namespace = meta.get("namespace")
        name = f"{namespace}/{doc.name}" if isinstance(namespace, str) and namespace else doc.name
        doc.bounded(name, "metadata.name")
        if name in names:
            other = names[name]
            doc.fail(
                "metadata.name",
                f"a second AuthorizationPolicy named {name!r} ({other.source} is one); "
                "names label the stats series",
            )
        names[name] = doc
        policy = _policy(doc, name, scoped)
        (dry_run if _dry_run(doc, policy.action) else by_action)[policy.action].append(policy)
    return Authorization(
        tuple(by_action["DENY"]),
        tuple(by_action["ALLOW"]),
        tuple(by_action["AUDIT"]),
        tuple(dry_run["DENY"]),
        tuple(dry_run["ALLOW"]),
    )


def _dry_run(doc: _Doc, action: Action) -> bool:
    """Whether the policy is in dry run (``metadata.annotations["istio.io/dry-run"]``)."""
    meta = doc.body.get("metadata") or {}
    annotations = doc.mapping(meta, "annotations", "metadata.annotations", required=False)
    if DRY_RUN not in annotations:
        return False
    path = f"metadata.annotations.{DRY_RUN}"
    value = annotations[DRY_RUN]
    if action == "AUDIT":
        doc.fail(path, "applies to ALLOW and DENY policies only (Istio's validation)")
    if not isinstance(value, str) or value not in DRY_RUN_VALUES:
        if not isinstance(value, str):
            got = f"{value!r}"[:40] + " (not a string: an annotation's value is one, quote it)"
        else:
            got = repr(value[:40])
        doc.fail(path, f'must be "true" or "false", got {got}')
    return DRY_RUN_VALUES[value]


def _policy(doc: _Doc, name: str, scoped: bool) -> Policy:
    spec = doc.spec() if doc.body.get("spec") is not None else {}
    if spec.get("targetRefs") == []:  # istiod: no target, the policy selects workloads
        spec = {key: value for key, value in spec.items() if key != "targetRefs"}
    doc.check(spec, "spec", schema.AUTHORIZATION_POLICY)
    selector = doc.mapping(spec, "selector", "spec.selector", required=False)
    doc.check(selector, "spec.selector", schema.PEER_SELECTOR)
    if label_map(doc, selector, "matchLabels", "spec.selector.matchLabels") and not scoped:
        doc.caution(
            "spec.selector",
            "its labels are not matched (this workload's namespace is not known: set "
            "spec.telemetry.workload.namespace or POD_NAMESPACE): the AuthorizationPolicy is "
            "taken as selecting this engine",
        )
    action = doc.get(spec, "action", "spec.action") or "ALLOW"
    if action == "CUSTOM":
        doc.fail(
            "spec.action",
            "CUSTOM is not supported by this engine: it delegates the decision to an "
            "external authorization service (ext-authz), which this engine does not call",
        )
    if action not in ("ALLOW", "DENY", "AUDIT"):
        doc.fail("spec.action", f"unknown action {action!r}; expected ALLOW, DENY or AUDIT")
    raw_rules = doc.sequence(spec, "rules", "spec.rules", required=False)
    if not raw_rules and action != "ALLOW":
        doc.caution(
            "spec.rules",
            f"a {action} policy without rules matches nothing (Istio's too): it has no effect",
        )
    rules = tuple(
        _rule(doc, raw, f"spec.rules[{i}]", cast(Action, action)) for i, raw in enumerate(raw_rules)
    )
    return Policy(name, cast(Action, action), rules)


class _Fields:
    """The checks of one ``source``, ``operation`` or ``when`` list, and whether an
    HTTP-only field was among them."""

    def __init__(self, doc: _Doc, action: Action) -> None:
        self.doc = doc
        self.action = action
        self.checks: list[Check] = []
        self.headers: list[Check] = []
        self.http_only = False

    def http(self, path: str) -> None:
        self.http_only = True
        self.doc.caution(path, HTTP_ONLY)


#: The field tables of a ``from`` entry and its ``source``, of a ``to`` entry and its
#: ``operation``.
_FROM = (schema.AUTHORIZATION_FROM, schema.AUTHORIZATION_SOURCE)
_TO = (schema.AUTHORIZATION_TO, schema.AUTHORIZATION_OPERATION)


def _rule(doc: _Doc, raw: Any, path: str, action: Action) -> Rule:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        doc.fail(path, f"must be a mapping, got {type(raw).__name__}")
    doc.check(raw, path, schema.AUTHORIZATION_RULE)
    sources, http_from = _alternatives(doc, raw, path, action, ("from", "source"), _FROM, _source)
    operations, http_to = _alternatives(
        doc, raw, path, action, ("to", "operation"), _TO, _operation
    )
    conditions = _Fields(doc, action)
    for i, item in enumerate(doc.sequence(raw, "when", f"{path}.when", required=False)):
        _condition(conditions, item, f"{path}.when[{i}]")
    if (http_from or http_to or conditions.http_only) and action == "ALLOW":
        return Rule(never=True)
    return Rule(sources, operations, tuple(conditions.checks), tuple(conditions.headers))


def _alternatives(
    doc: _Doc,
    raw: dict[str, Any],
    path: str,
    action: Action,
    keys: tuple[str, str],
    tables: tuple[schema.Fields, schema.Fields],
    read: Callable[[_Fields, dict[str, Any], str], None],
) -> tuple[tuple[tuple[Check, ...], ...], bool]:
    """A rule's ``from`` (each a ``source``) or ``to`` (each an ``operation``) list: the
    checks of each entry, and whether an HTTP-only field was among them."""
    outer, inner = keys
    table, inner_table = tables
    found_all: list[tuple[Check, ...]] = []
    http_only = False
    for i, item in enumerate(doc.sequence(raw, outer, f"{path}.{outer}", required=False)):
        where = f"{path}.{outer}[{i}]"
        entry = _entry(doc, item, where, inner, table)
        doc.check(entry, f"{where}.{inner}", inner_table)
        found = _Fields(doc, action)
        read(found, entry, f"{where}.{inner}")
        http_only = http_only or found.http_only
        found_all.append(tuple(found.checks))
    return tuple(found_all), http_only


def _entry(doc: _Doc, item: Any, path: str, key: str, table: schema.Fields) -> dict[str, Any]:
    """The ``source`` of a ``from`` entry (or ``operation`` of a ``to``): required and not
    empty, as Istio's validation says."""
    if not isinstance(item, dict):
        doc.fail(path, f"must be a mapping with {key}, got {type(item).__name__}")
    doc.check(item, path, table)
    inner = doc.mapping(item, key, f"{path}.{key}")
    if not any(v not in (None, []) for v in inner.values()):
        doc.fail(f"{path}.{key}", "must not be empty (Istio's validation)")
    return inner


def _strings(doc: _Doc, obj: Mapping[str, Any], key: str, path: str) -> list[str] | None:
    """A list of non-empty strings (``None``: absent or empty)."""
    values = doc.sequence(obj, key, path, required=False)
    if not values:
        return None
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            doc.fail(f"{path}[{i}]", f"must be a non-empty string, got {value!r}")
    return [str(v) for v in values]


def _string_match(doc: _Doc, values: list[str], path: str) -> Matcher:
    for i, value in enumerate(values):
        if "*" in value[1:-1] or value.count("*") > 1:
            doc.fail(
                f"{path}[{i}]",
                f"{value[:60]!r}: '*' is allowed only alone, as a prefix or as a suffix",
            )
    return authz.Strings(values)


def _address_match(doc: _Doc, values: list[str], path: str) -> Matcher:
    networks = []
    for i, value in enumerate(values):
        try:
            networks.append(_unmapped(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            doc.fail(f"{path}[{i}]", f"{value[:60]!r} is not an IP address or a CIDR block")
    return Addresses(networks)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(net: authz.IpNetwork) -> authz.IpNetwork:
    """An IPv4-mapped IPv6 block as the IPv4 block it maps: a peer's mapped address is
    judged as its IPv4 address (else such a block would match no one, a DENY none)."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def _port_match(doc: _Doc, values: list[str], path: str) -> Matcher:
    ports = []
    for i, value in enumerate(values):
        digits = value.isascii() and value.isdigit() and len(value) <= 5
        if not digits or not 0 <= int(value) <= 65535:
            doc.fail(f"{path}[{i}]", f"must be a port number (0-65535), got {value[:60]!r}")
        ports.append(int(value))
    return Ports(ports)


def _account_match(doc: _Doc, values: list[str], path: str) -> Matcher:
    for i, value in enumerate(values):
        if value.count("/") != 1 or "*" in value:
            doc.fail(f"{path}[{i}]", f"must be namespace/serviceaccount, got {value[:60]!r}")
    return authz.Strings(values)


_Compile = Callable[["_Doc", list[str], str], Matcher]


def _pair(
    found: _Fields,
    obj: Mapping[str, Any],
    key: str,
    not_key: str,
    path: str,
    attribute: str,
    compile: _Compile,
) -> None:
    """The check of ``key`` and ``not_key`` (its negation) of ``obj``, if either is set."""
    doc = found.doc
    values = _strings(doc, obj, key, f"{path}.{key}")
    not_values = _strings(doc, obj, not_key, f"{path}.{not_key}")
    if values is None and not_values is None:
        return
    found.checks.append(
        Check(
            attribute,
            None if values is None else compile(doc, values, f"{path}.{key}"),
            None if not_values is None else compile(doc, not_values, f"{path}.{not_key}"),
        )
    )


def _source(found: _Fields, source: Mapping[str, Any], path: str) -> None:
    _pair(found, source, "principals", "notPrincipals", path, "principal", _string_match)
    _pair(found, source, "namespaces", "notNamespaces", path, "namespace", _string_match)
    _pair(
        found, source, "serviceAccounts", "notServiceAccounts", path, "service_account",
        _account_match,
    )  # fmt: skip
    _pair(found, source, "ipBlocks", "notIpBlocks", path, "source_ip", _address_match)
    _pair(found, source, "remoteIpBlocks", "notRemoteIpBlocks", path, "remote_ip", _address_match)
    for key in ("requestPrincipals", "notRequestPrincipals"):
        if source.get(key):
            found.http(f"{path}.{key}")


def _operation(found: _Fields, operation: Mapping[str, Any], path: str) -> None:
    _pair(found, operation, "ports", "notPorts", path, "port", _port_match)
    for key in ("methods", "notMethods", "paths", "notPaths", "hosts", "notHosts"):
        if operation.get(key):
            found.http(f"{path}.{key}")


def _condition(found: _Fields, item: Any, path: str) -> None:
    doc = found.doc
    if not isinstance(item, dict):
        doc.fail(path, f"must be a mapping with key and values, got {type(item).__name__}")
    doc.check(item, path, schema.AUTHORIZATION_CONDITION)
    key = cast(str, doc.string(item, "key", f"{path}.key"))
    if doc.get(item, "values", f"{path}.values") in (None, []) and doc.get(
        item, "notValues", f"{path}.notValues"
    ) in (None, []):
        doc.fail(path, "values or notValues is required (Istio's validation)")
    if key.startswith(HTTP_ONLY_KEYS):
        found.http(f"{path}.key")
        return
    if key.startswith(HEADER_KEY + "["):
        name = key[len(HEADER_KEY) + 1 :]
        if not name.endswith("]") or len(name) < 2:
            doc.fail(f"{path}.key", f"expected request.headers[NAME], got {key[:80]!r}")
        inner = _Fields(doc, found.action)
        _pair(inner, item, "values", "notValues", path, "header", _string_match)
        check = inner.checks[0]
        found.headers.append(Check("header", check.values, check.not_values, name[:-1].lower()))
        return
    attribute = CONNECTION_KEYS.get(key)
    if attribute is None:
        doc.fail(
            f"{path}.key",
            f"unknown or unsupported key {key[:80]!r}; expected one of "
            f"{', '.join(CONNECTION_KEYS)}, request.headers[NAME] (a request attribute)",
        )
    compile: _Compile = _string_match
    if attribute in ("source_ip", "remote_ip", "destination_ip"):
        compile = _address_match
    elif attribute == "port":
        compile = _port_match
    elif attribute == "service_account":
        compile = _account_match
    _pair(found, item, "values", "notValues", path, attribute, compile)
