"""Which PeerAuthentications and AuthorizationPolicies apply to this workload, as istiod
selects them for a sidecar.

A policy applies when it is in the workload's namespace or in the mesh's root namespace,
and its ``selector.matchLabels`` (if any) are all among the workload's labels. In the root
namespace, a PeerAuthentication with a selector applies to no one (istiod ignores it) and
an AuthorizationPolicy with one applies to the matching workloads of every namespace. An
AuthorizationPolicy with a ``targetRef`` binds to a Gateway or a waypoint, not to a
workload. A policy without ``metadata.namespace`` is in the workload's namespace (as
``kubectl apply -n`` would put it). Without a known namespace every policy applies (the
engine as one workload: the loader's behaviour before namespaces were read).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .models import PolicyScope

if TYPE_CHECKING:
    from .loader import _Doc


#: A Kubernetes namespace name (an RFC 1123 label), as Istio's validation requires it.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def namespace_error(namespace: str) -> str | None:
    """Why ``namespace`` is no Kubernetes namespace (``None``: it is one)."""
    if _NAMESPACE.fullmatch(namespace):
        return None
    return (
        f"{namespace[:80]!r} is not a namespace name (lower-case letters, digits and '-', at "
        "most 63; Istio's validation): no workload is in it"
    )


def namespace_of(doc: _Doc, default: str) -> str:
    """The document's ``metadata.namespace`` (``default`` when it has none); one no
    namespace could have is refused (``Shop``, `` shop``: a policy skipped for it would be
    a bypass)."""
    namespace = doc.body["metadata"].get("namespace")
    if namespace is None or namespace == "":
        return default
    if not isinstance(namespace, str):
        doc.fail("metadata.namespace", f"must be a string, got {namespace!r}")
    why = namespace_error(namespace)
    if why is not None:
        doc.fail("metadata.namespace", why)
    return namespace


def label_map(doc: _Doc, obj: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
    """Labels a policy is selected by (a ``selector``'s ``matchLabels``, the workload's own),
    refused as Kubernetes and Istio's validation refuse them, for they would match no pod and
    a policy meant for this workload would be skipped: a key or value that is not a string
    (YAML reads ``1.10`` as the number 1.1, ``010`` as 8), an empty key, a ``*``."""
    raw = doc.mapping(obj, key, path, required=False)
    out = {}
    for name, value in raw.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not isinstance(value, str):
            doc.fail(
                where,
                f"a label's key and value are strings, got {name!r}: {value!r} (quote it: "
                "YAML reads 1.10 as the number 1.1)",
            )
        if name == "" or "*" in name or "*" in value:
            doc.fail(
                where,
                f"{name[:64]}={value[:64]}: an empty key or a wildcard is not supported (Istio's "
                "validation of a selector; no pod has such a label)",
            )
        out[name] = value
    return out


def select(docs: list[_Doc], scope: PolicyScope | None, not_applied: list[str]) -> list[_Doc]:
    """The documents of ``docs`` that apply to the workload of ``scope`` (all of them when
    it is ``None``); each other one is logged once, and added to ``not_applied`` as
    ``Kind/namespace/name: why``."""
    if scope is None:
        return docs
    applied = []
    for doc in docs:
        why = _why_not(doc, scope)
        if why is None:
            applied.append(doc)
            continue
        doc.skip(why)
        not_applied.append(f"{doc.kind}/{namespace_of(doc, scope.namespace)}/{doc.name}: {why}")
    return applied


def _why_not(doc: _Doc, scope: PolicyScope) -> str | None:
    """Why the policy ``doc`` does not apply to the workload of ``scope`` (``None``: it does)."""
    namespace = namespace_of(doc, scope.namespace)
    root = namespace == scope.root_namespace
    if namespace != scope.namespace and not root:
        return (
            f"its namespace {namespace!r} is neither this workload's ({scope.namespace!r}) "
            f"nor the root namespace ({scope.root_namespace!r})"
        )
    spec: Any = doc.body.get("spec")
    if not isinstance(spec, dict):
        return None  # applies, and its checks say what is wrong
    if doc.kind == "AuthorizationPolicy" and _targets(doc, spec):
        return "its targetRef binds it to a Gateway or a waypoint, not to a workload"
    selector = spec.get("selector")
    if not isinstance(selector, dict):
        return None
    labels = label_map(doc, selector, "matchLabels", "spec.selector.matchLabels")
    if not labels:
        return None  # Istio: an empty selector is no selector
    if doc.kind == "PeerAuthentication" and root:
        return (
            "a PeerAuthentication with a selector in the root namespace applies to no "
            "workload (istiod ignores it; the mesh level has no selector)"
        )
    if scope.labels_error is not None:
        doc.fail(
            "spec.selector.matchLabels",
            f"this workload's labels are not known ({scope.labels_error}), so whether the "
            "selector matches them is not known: fix it, or give them in "
            "spec.telemetry.workload.labels",
        )
    missing = [
        f"{key[:64]}={value[:64]}"
        for key, value in labels.items()
        if scope.labels.get(key) != value
    ]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        return f"its selector does not match this workload's labels ({shown} not among them)"
    return None


def _targets(doc: _Doc, spec: dict[str, Any]) -> bool:
    """Whether the AuthorizationPolicy names a Gateway or a waypoint: a ``targetRef``, or a
    ``targetRefs`` list with one (istiod: an empty ``targetRefs`` is none, and the policy
    selects workloads). An empty ``targetRef`` is refused, as Istio's validation does."""
    ref = spec.get("targetRef")
    if ref is not None:
        if not isinstance(ref, dict) or not ref.get("name"):
            doc.fail("spec.targetRef", "must be a mapping with kind and name (Istio's validation)")
        return True
    refs = spec.get("targetRefs")
    if refs is None or refs == []:
        return False
    if not isinstance(refs, list) or not all(isinstance(r, dict) and r.get("name") for r in refs):
        doc.fail("spec.targetRefs", "must be a list of mappings with kind and name")
    return True
