"""Which PeerAuthentications and AuthorizationPolicies apply to the engine, as istiod selects
them for a sidecar: those of the workload's namespace and of the root namespace whose
``selector`` matches the workload's labels (a PeerAuthentication with a selector in the root
namespace: none), the others skipped with a line each and listed in ``/config_dump``;
PeerAuthentication's mesh, namespace and workload levels. The workload's namespace unknown,
every policy applies, as before. Configuration checks, and real sockets (mutual TLS
clients of the mesh PKI of ``mesh_pki``, the KV codec)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mesh_pki import MeshCa
from proxy_kit import Client, Upstream, address, engine_for, error_type, http_get, mesh, run

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.config.models import Config

#: The engine's pod: what ``POD_NAMESPACE`` and ``ISTIO_METAJSON_LABELS`` say in a sidecar.
NAMESPACE, LABELS = "shop", {"app": "greeter", "version": "v1"}


@pytest.fixture
def pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine runs in namespace ``shop`` with the pod labels ``app: greeter, version: v1``."""
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("ISTIO_METAJSON_LABELS", json.dumps(LABELS))


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's namespace is not known (no ``POD_NAMESPACE``)."""
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.delenv("ISTIO_METAJSON_LABELS", raising=False)


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


def doc(kind: str, name: str, namespace: str | None, spec: str) -> str:
    """A PeerAuthentication or AuthorizationPolicy (``spec`` a YAML block)."""
    ns = f", namespace: {namespace}" if namespace else ""
    return (
        f"apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}{ns}}}\n"
        "spec:\n" + textwrap.indent(textwrap.dedent(spec), "  ")
    )


def allow(name: str, namespace: str | None, selector: str = "") -> str:
    """An ALLOW policy letting in ``cluster.local/ns/default/sa/frontend`` only."""
    more = f"selector: {selector}\n" if selector else ""
    return doc(
        "AuthorizationPolicy",
        name,
        namespace,
        more
        + "rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}]}]\n",
    )


def peer(name: str, namespace: str | None, mode: str, selector: str = "") -> str:
    more = f"selector: {selector}\n" if selector else ""
    return doc("PeerAuthentication", name, namespace, more + f"mtls: {{mode: {mode}}}\n")


def load(tmp_path: Path, ca: MeshCa, *docs: str, proxy: str = "") -> Config:
    certs = tmp_path / "certs"
    if not certs.exists():
        ca.write(certs, "engine")
    text = mesh(
        [(1, "v1")],
        proxy=f"meshIdentity: {{directory: '{certs}'}}\n" + proxy,
        extra="---\n".join(docs),
    )
    return loads_config(text, "t.yaml")


def applied(cfg: Config) -> tuple[str, ...]:
    authorization = cfg.proxy.authorization
    return () if authorization is None else authorization.names


# -- AuthorizationPolicy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy,name,why",
    [
        (allow("mine", None), "mine", None),  # no namespace: the workload's
        (allow("mine", "shop"), "shop/mine", None),
        (allow("mesh", "istio-system"), "istio-system/mesh", None),
        (allow("billing", "billing"), None, "its namespace 'billing' is neither this"),
        (allow("greeter", "shop", "{matchLabels: {app: greeter}}"), "shop/greeter", None),
        (allow("all", "shop", "{matchLabels: {}}"), "shop/all", None),  # empty: no selector
        (
            allow("both", "shop", "{matchLabels: {app: greeter, version: v1}}"),
            "shop/both",
            None,
        ),
        (
            allow("cart", "shop", "{matchLabels: {app: cart}}"),
            None,
            "does not match this workload's labels (app=cart not among them)",
        ),
        (
            allow("v2", "shop", "{matchLabels: {app: greeter, version: v2}}"),
            None,
            "(version=v2 not among them)",
        ),
        # The root namespace's selector picks workloads of every namespace.
        (
            allow("greeters", "istio-system", "{matchLabels: {app: greeter}}"),
            "istio-system/greeters",
            None,
        ),
        (allow("carts", "istio-system", "{matchLabels: {app: cart}}"), None, "does not match"),
        (allow("elsewhere", "billing", "{matchLabels: {app: greeter}}"), None, "neither"),
        # A Gateway's or a waypoint's policy (refused when the namespace is unknown).
        (
            doc("AuthorizationPolicy", "gw", "shop", "targetRefs: [{kind: Gateway, name: gw}]\n"),
            None,
            "targetRef binds it to a Gateway or a waypoint",
        ),
        # An empty targetRefs names no target: istiod selects workloads with it (a DENY policy
        # skipped here was a bypass).
        (
            doc(
                "AuthorizationPolicy", "none", "shop", "targetRefs: []\naction: DENY\nrules: [{}]\n"
            ),
            "shop/none",
            None,
        ),
        # Not this engine's: not checked as the engine would (CUSTOM is refused here).
        (
            doc("AuthorizationPolicy", "ext", "billing", "action: CUSTOM\nprovider: {name: x}\n"),
            None,
            "neither",
        ),
    ],
)
def test_authorization_policies_apply_as_istiod_selects_them(
    pod: None,
    ca: MeshCa,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    policy: str,
    name: str | None,
    why: str | None,
) -> None:
    with caplog.at_level(logging.INFO, logger="metaprotocol.config"):
        cfg = load(tmp_path, ca, policy)
    assert applied(cfg) == ((name,) if name else ())
    lines = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    if why is None:
        assert cfg.proxy.policies_not_applied == () and lines == []
        assert "labels are not matched" not in caplog.text
    else:
        (skipped,) = cfg.proxy.policies_not_applied
        assert skipped.startswith("AuthorizationPolicy/") and why in skipped
        (line,) = lines
        assert "t.yaml (document" in line and why in line


def test_the_root_namespace_is_a_setting(pod: None, ca: MeshCa, tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        ca,
        allow("a", "mesh-root"),
        allow("b", "istio-system"),
        proxy="mesh: {rootNamespace: mesh-root}\n",
    )
    assert applied(cfg) == ("mesh-root/a",)
    (skipped,) = cfg.proxy.policies_not_applied
    assert "'istio-system' is neither" in skipped and "root namespace ('mesh-root')" in skipped
    assert cfg.proxy.policy_scope is not None
    assert cfg.proxy.policy_scope.root_namespace == "mesh-root"


def test_the_workload_can_be_configured(nowhere: None, ca: MeshCa, tmp_path: Path) -> None:
    """``spec.telemetry.workload``'s ``namespace`` and ``labels`` instead of the sidecar's
    variables; the labels also give the metrics' ``app`` and ``version``."""
    workload = "telemetry: {workload: {namespace: shop, labels: {app: greeter, tier: '1'}}}\n"
    cfg = load(
        tmp_path,
        ca,
        allow("tier", "shop", "{matchLabels: {tier: '1'}}"),
        allow("cart", "shop", "{matchLabels: {app: cart}}"),
        proxy=workload,
    )
    assert applied(cfg) == ("shop/tier",)
    assert cfg.proxy.telemetry.workload.app == "greeter"
    assert dict(cfg.proxy.telemetry.workload.labels) == {"app": "greeter", "tier": "1"}


def test_without_a_namespace_every_policy_applies_as_before(
    nowhere: None, ca: MeshCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        cfg = load(
            tmp_path,
            ca,
            allow("billing", "billing"),
            allow("cart", "shop", "{matchLabels: {app: cart}}"),
        )
    assert applied(cfg) == ("billing/billing", "shop/cart")
    assert cfg.proxy.policy_scope is None and cfg.proxy.policies_not_applied == ()
    assert "labels are not matched" in caplog.text and "POD_NAMESPACE" in caplog.text
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, ca, doc("AuthorizationPolicy", "gw", "x", "targetRef: {kind: Gateway}\n"))
    assert caught.value.field == "spec.targetRef"


@pytest.mark.parametrize("known", [True, False])
def test_an_empty_target_list_is_no_target(
    known: bool, monkeypatch: pytest.MonkeyPatch, ca: MeshCa, tmp_path: Path
) -> None:
    """``targetRefs: []`` binds nothing (istiod's ``len(targetRefs) == 0``): the DENY policy
    applies to the workload, its namespace known or not; a ``targetRef`` without a name is
    refused (Istio's validation), not taken as binding a Gateway."""
    monkeypatch.delenv("ISTIO_METAJSON_LABELS", raising=False)
    if known:
        monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    else:
        monkeypatch.delenv("POD_NAMESPACE", raising=False)
    deny = doc("AuthorizationPolicy", "d", "shop", "targetRefs: []\naction: DENY\nrules: [{}]\n")
    cfg = load(tmp_path, ca, deny)
    assert cfg.proxy.authorization is not None
    assert [p.name for p in cfg.proxy.authorization.deny] == ["shop/d"]
    assert cfg.proxy.policies_not_applied == ()
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, ca, doc("AuthorizationPolicy", "t", "shop", "targetRef: {}\n"))
    assert caught.value.field == "spec.targetRef"


@pytest.mark.parametrize("known", [True, False])
@pytest.mark.parametrize(
    "kind,selector,field",
    [
        # YAML reads 1.10 as the number 1.1: the pod's "1.10" did not match, and the DENY
        # policy meant for it was skipped.
        ("AuthorizationPolicy", "{matchLabels: {version: 1.10}}", "version"),
        ("AuthorizationPolicy", "{matchLabels: {app: greeter, tier: 1}}", "tier"),
        ("AuthorizationPolicy", "{matchLabels: {app: '*'}}", "app"),
        ("AuthorizationPolicy", "{matchLabels: {'': greeter}}", ""),
        ("PeerAuthentication", "{matchLabels: {version: 1.10}}", "version"),
        ("PeerAuthentication", "{matchLabels: {'app*': greeter}}", "app*"),
    ],
)
def test_selectors_no_pod_could_match_are_refused(
    known: bool,
    kind: str,
    selector: str,
    field: str,
    monkeypatch: pytest.MonkeyPatch,
    ca: MeshCa,
    tmp_path: Path,
) -> None:
    """Kubernetes takes a label value as a string only, and Istio's validation refuses an
    empty key and a wildcard: such a selector matches no pod, and a DENY or STRICT policy
    written for this workload would be skipped; it is refused instead."""
    monkeypatch.setenv("ISTIO_METAJSON_LABELS", json.dumps({**LABELS, "version": "1.10"}))
    if known:
        monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    else:
        monkeypatch.delenv("POD_NAMESPACE", raising=False)
    spec = f"selector: {selector}\n" + (
        "action: DENY\nrules: [{}]\n" if kind == "AuthorizationPolicy" else "mtls: {mode: STRICT}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, ca, doc(kind, "mine", "shop", spec))
    assert caught.value.field == f"spec.selector.matchLabels.{field}"
    # Quoted, it is this workload's.
    if "1.10" in selector:
        cfg = load(tmp_path, ca, doc(kind, "mine", "shop", spec.replace("1.10", "'1.10'")))
        assert cfg.proxy.policies_not_applied == ()


def test_the_workloads_own_labels_are_strings(nowhere: None, ca: MeshCa, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(
            tmp_path,
            ca,
            proxy="telemetry: {workload: {namespace: shop, labels: {version: 1.10}}}\n",
        )
    assert caught.value.field == "spec.telemetry.workload.labels.version"


DENY_GREETER = doc(
    "AuthorizationPolicy",
    "no-intruder",
    "shop",
    "selector: {matchLabels: {app: greeter}}\naction: DENY\n"
    "rules: [{from: [{source: {principals: ['*/sa/intruder']}}]}]\n",
)


@pytest.mark.parametrize(
    "labels",
    [
        "{app: greeter}",  # not JSON
        '["app", "greeter"]',  # not an object
        '{"app": "greeter", "version": 1}',  # not all strings (Go's map[string]string fails)
        "[" * 5000,  # nested too deep: RecursionError, a traceback at start
    ],
    ids=["invalid", "list", "number", "deep"],
)
def test_unreadable_pod_labels_refuse_a_selector_they_would_decide(
    labels: str, monkeypatch: pytest.MonkeyPatch, ca: MeshCa, tmp_path: Path
) -> None:
    """``ISTIO_METAJSON_LABELS`` unreadable: the labels were taken as none, and the DENY
    policy selecting this workload was skipped (a bypass). A selector they would decide is
    refused, naming the variable; the labels given in the file instead, it applies; no
    policy with a selector, the engine starts (the labels unknown)."""
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("ISTIO_METAJSON_LABELS", labels)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, ca, DENY_GREETER)
    assert caught.value.field == "spec.selector.matchLabels"
    assert "ISTIO_METAJSON_LABELS" in str(caught.value)
    cfg = load(tmp_path, ca, allow("mine", "shop"))
    assert applied(cfg) == ("shop/mine",) and cfg.proxy.telemetry.workload.labels == {}
    cfg = load(
        tmp_path, ca, DENY_GREETER, proxy="telemetry: {workload: {labels: {app: greeter}}}\n"
    )
    assert applied(cfg) == ("shop/no-intruder",)


@pytest.mark.parametrize("namespace", ["Shop", "' shop'", "shop.", "'shop '"])
def test_namespaces_no_workload_could_be_in_are_refused(
    pod: None, namespace: str, ca: MeshCa, tmp_path: Path
) -> None:
    """A policy's ``metadata.namespace`` that is no namespace name (Istio's validation and
    Kubernetes refuse it) was compared as written and the policy skipped: a DENY policy or
    a STRICT PeerAuthentication written for the workload's namespace with a capital or a
    space was bypassed. It is refused, as is such a workload or root namespace."""
    deny = doc("AuthorizationPolicy", "d", namespace, "action: DENY\nrules: [{}]\n")
    strict = peer("default", namespace, "STRICT")
    for policy in (deny, strict):
        with pytest.raises(ConfigError) as caught:
            load(tmp_path, ca, policy)
        assert caught.value.field == "metadata.namespace"
    for proxy, field in (
        (f"telemetry: {{workload: {{namespace: {namespace}}}}}\n", "workload.namespace"),
        (f"mesh: {{rootNamespace: {namespace}}}\n", "mesh.rootNamespace"),
    ):
        with pytest.raises(ConfigError) as caught:
            load(tmp_path, ca, proxy=proxy)
        assert caught.value.field == f"spec.telemetry.{field}".replace("telemetry.mesh", "mesh")


# -- PeerAuthentication -----------------------------------------------------------------------

GREETER = "{matchLabels: {app: greeter}}"


@pytest.mark.parametrize(
    "docs,expected,skipped",
    [
        ((peer("default", "istio-system", "STRICT"),), "STRICT", 0),
        ((peer("default", "shop", "STRICT"),), "STRICT", 0),
        ((peer("default", None, "STRICT"),), "STRICT", 0),  # no namespace: the workload's
        # The namespace's over the mesh's (both without a selector: two levels, no error).
        ((peer("m", "istio-system", "STRICT"), peer("n", "shop", "DISABLE")), "DISABLE", 0),
        ((peer("m", "istio-system", "STRICT"), peer("n", "shop", "UNSET")), "STRICT", 0),
        # The workload's over both; UNSET inherits the nearest level that says.
        (
            (
                peer("m", "istio-system", "DISABLE"),
                peer("n", "shop", "STRICT"),
                peer("w", "shop", "UNSET", GREETER),
            ),
            "STRICT",
            0,
        ),
        (
            (peer("m", "istio-system", "STRICT"), peer("w", "shop", "DISABLE", GREETER)),
            "DISABLE",
            0,
        ),
        # Not this workload's: skipped.
        ((peer("default", "billing", "DISABLE"),), "PERMISSIVE", 1),
        ((peer("cart", "shop", "DISABLE", "{matchLabels: {app: cart}}"),), "PERMISSIVE", 1),
        # A selector in the root namespace: istiod ignores it.
        ((peer("w", "istio-system", "DISABLE", GREETER),), "PERMISSIVE", 1),
        # Every namespace's default, as `kubectl get -A` gives them: this one's applies.
        (
            (
                peer("default", "istio-system", "PERMISSIVE"),
                peer("default", "billing", "DISABLE"),
                peer("default", "shop", "STRICT"),
                peer("default", "web", "DISABLE"),
            ),
            "STRICT",
            2,
        ),
    ],
)
def test_peer_authentication_levels_as_istiod(
    pod: None, ca: MeshCa, tmp_path: Path, docs: tuple[str, ...], expected: str, skipped: int
) -> None:
    cfg = load(tmp_path, ca, *docs)
    (listener,) = cfg.proxy.listeners
    assert listener.peer_mode == expected
    assert len(cfg.proxy.policies_not_applied) == skipped
    assert all(s.startswith("PeerAuthentication/") for s in cfg.proxy.policies_not_applied)


def test_peer_authentications_of_others_need_no_identity(pod: None) -> None:
    """Another namespace's STRICT is not checked against this engine (which has no
    ``meshIdentity``, and would refuse STRICT of its own)."""
    cfg = loads_config(mesh([(1, "v1")], extra=peer("default", "billing", "STRICT")), "t.yaml")
    (listener,) = cfg.proxy.listeners
    assert listener.peer_mode is None and cfg.proxy.peer_authentication is None
    with pytest.raises(ConfigError, match=r"set spec\.meshIdentity"):
        loads_config(mesh([(1, "v1")], extra=peer("default", "shop", "STRICT")), "t.yaml")


def created(text: str, when: str) -> str:
    """``text`` (a document of :func:`doc`) with ``metadata.creationTimestamp: when``."""
    return text.replace("metadata: {name:", f"metadata: {{creationTimestamp: {when}, name:", 1)


def test_two_peer_authentications_of_one_level_without_creation_times_are_refused(
    pod: None, ca: MeshCa, tmp_path: Path
) -> None:
    """istiod applies the oldest; without both creation times, which one is not known."""
    for lacking, docs in (
        ("a", (peer("a", "shop", "STRICT"), peer("b", None, "DISABLE"))),
        (
            "b",
            (
                created(peer("a", "shop", "STRICT"), '"2025-01-01T00:00:00Z"'),
                peer("b", None, "DISABLE"),
            ),
        ),
    ):
        with pytest.raises(ConfigError) as caught:
            load(tmp_path, ca, *docs)
        assert caught.value.field == "kind"
        text = str(caught.value)
        assert "second PeerAuthentication of this workload's namespace level" in text
        assert f"PeerAuthentication/{lacking} has none" in text and "creationTimestamp" in text


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ('"2025-01-01T00:00:00Z"', '"2025-06-01T00:00:00Z"', "STRICT"),  # a is older
        ('"2025-06-01T00:00:00Z"', '"2025-01-01T00:00:00Z"', "DISABLE"),  # b is older
        ('"2025-01-01T00:00:00Z"', '"2025-01-01T00:00:00Z"', "STRICT"),  # a tie: by name
        ("2025-06-01T00:00:00Z", "2025-01-01 00:00:00", "DISABLE"),  # YAML timestamps
        ('"2025-01-01T02:00:00+02:00"', '"2025-01-01T00:30:00Z"', "STRICT"),  # zones
    ],
)
def test_of_two_peer_authentications_of_one_level_the_oldest_applies_as_in_istiod(
    pod: None,
    ca: MeshCa,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    a: str,
    b: str,
    expected: str,
) -> None:
    """As ``kubectl get peerauthentications -A -o yaml`` gives them: istiod's
    ComposePeerAuthentication applies the oldest of a level (then the first by name), and
    the other is named in a warning; in either file order, at either level."""
    first = created(peer("a", "shop", "STRICT"), a)
    second = created(peer("b", None, "DISABLE"), b)
    older = "PeerAuthentication/shop/a" if expected == "STRICT" else "PeerAuthentication/shop/b"
    for docs in ((first, second), (second, first)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
            cfg = load(tmp_path, ca, *docs)
        (listener,) = cfg.proxy.listeners
        assert listener.peer_mode == expected
        assert cfg.proxy.peer_authentication is not None
        assert cfg.proxy.peer_authentication.sources == (older,)
        (warning,) = [r.getMessage() for r in caplog.records if "second Peer" in r.getMessage()]
        assert f"{older}, the oldest" in warning
    workload = created(peer("w1", "shop", "DISABLE", "{matchLabels: {app: greeter}}"), a)
    other = created(peer("w2", "shop", "STRICT", "{matchLabels: {version: v1}}"), b)
    cfg = load(tmp_path, ca, other, workload)
    (listener,) = cfg.proxy.listeners
    assert listener.peer_mode == ("DISABLE" if expected == "STRICT" else "STRICT")


def test_of_three_peer_authentications_of_one_level_each_warning_names_the_one_applied(
    pod: None, ca: MeshCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each one ignored names the oldest of the level, the one applied: not the oldest of
    those read so far (the first one's warning named the second, itself ignored)."""
    docs = (
        created(peer("a", "shop", "STRICT"), '"2025-06-01T00:00:00Z"'),
        created(peer("b", "shop", "DISABLE"), '"2025-03-01T00:00:00Z"'),
        created(peer("c", "shop", "PERMISSIVE"), '"2025-01-01T00:00:00Z"'),
    )
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        cfg = load(tmp_path, ca, *docs)
    assert cfg.proxy.peer_authentication is not None
    assert cfg.proxy.peer_authentication.sources == ("PeerAuthentication/shop/c",)
    warnings = [r.getMessage() for r in caplog.records if "second Peer" in r.getMessage()]
    assert len(warnings) == 2
    for name, warning in zip("ab", sorted(warnings), strict=True):
        assert f"PeerAuthentication/{name})" in warning
        assert "PeerAuthentication/shop/c, the oldest" in warning, warning


def test_a_creation_time_that_is_not_a_time_is_refused(
    pod: None, ca: MeshCa, tmp_path: Path
) -> None:
    first = created(peer("a", "shop", "STRICT"), '"yesterday"')
    second = created(peer("b", None, "DISABLE"), '"2025-01-01T00:00:00Z"')
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, ca, first, second)
    assert caught.value.field == "metadata.creationTimestamp"
    assert "must be a time such as 2025-01-31T12:00:00Z, got 'yesterday'" in str(caught.value)


# -- on the wire ------------------------------------------------------------------------------


def test_policies_of_other_workloads_do_not_deny_this_engines_callers(
    pod: None, ca: MeshCa, tmp_path: Path
) -> None:
    """The mesh's policies, as ``kubectl get -A`` gives them: an ALLOW policy of another
    workload of the namespace, one of another namespace, and a STRICT PeerAuthentication of
    another namespace. None is this engine's: a mesh client of any identity and a
    plain-text client are served (before, both were denied: the ALLOW policies applied);
    the policy that selects this engine still denies. ``/config_dump`` lists which apply."""
    mine = doc(
        "AuthorizationPolicy",
        "no-intruder",
        "shop",
        "selector: {matchLabels: {app: greeter}}\naction: DENY\n"
        "rules: [{from: [{source: {principals: ['*/sa/intruder']}}]}]\n",
    )
    docs = (
        allow("cart-callers", "shop", "{matchLabels: {app: cart}}"),
        allow("billing-callers", "billing"),
        peer("default", "billing", "STRICT"),
        mine,
    )

    async def main() -> None:
        up = await Upstream("v1").start()
        certs = tmp_path / "certs"
        ca.write(certs, "engine")
        text = mesh(
            [(up.port, "v1")],
            proxy=f"meshIdentity: {{directory: '{certs}'}}\n",
            extra="---\n".join(docs),
        )
        async with engine_for(text) as engine:
            clients = []
            for sa in ("caller", "intruder"):
                ctx = ca.client_context(tmp_path / sa, None)
                ctx.load_cert_chain(*ca.files(tmp_path / sa, sa, "default"))
                clients.append(await Client.connect(address(engine), ssl=ctx))
            clients.append(await Client.connect(address(engine)))  # plain text
            caller, intruder, plain = clients
            assert error_type(await caller.call("get", rid=1)) is None
            assert error_type(await plain.call("get", rid=2)) is None
            assert error_type(await intruder.call("get", rid=3)) == "PermissionDenied"
            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            dump = json.loads(body)
            assert dump["authorizationPolicies"] == {
                "DENY": ["shop/no-intruder"],
                "ALLOW": [],
                "AUDIT": [],
            }
            assert dump["policyScope"]["namespace"] == "shop"
            assert dump["policyScope"]["labels"] == LABELS
            assert [line.split(":")[0] for line in dump["policiesNotApplied"]] == [
                "PeerAuthentication/billing/default",
                "AuthorizationPolicy/shop/cart-callers",
                "AuthorizationPolicy/billing/billing-callers",
            ]
            assert dump["peerAuthentication"] is None
            for client in clients:
                client.close()
        await up.close()
        assert len(up.received) == 2

    run(main())


def check(config: Path, env: dict[str, str]) -> list[str]:
    """``metaprotocol proxy --check`` of ``config`` in a process with ``env``: its stdout lines."""
    run_env = {
        k: v for k, v in os.environ.items() if k not in ("POD_NAMESPACE", "ISTIO_METAJSON_LABELS")
    }
    proc = subprocess.run(
        [sys.executable, "-m", "metaprotocol_sdk", "proxy", "--check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**run_env, **env},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_check_says_which_policies_apply_and_for_which_workload(tmp_path: Path, ca: MeshCa) -> None:
    """``--check`` is where an operator tries the mesh's policies before a rollout: beside
    the summary it says for which workload they were selected (or that its namespace is not
    known, so every one applies), the PeerAuthentication mode and how many
    AuthorizationPolicies apply by action and how many do not. (It said nothing of them: the
    same files passed with a namespace that skipped every policy.)"""
    ca.write(tmp_path / "certs", "engine")
    config = tmp_path / "mesh.yaml"
    config.write_text(
        mesh([(1, "v1")], proxy=f"meshIdentity: {{directory: '{tmp_path / 'certs'}'}}\n")
        + "---\n"
        + doc("PeerAuthentication", "default", "istio-system", "mtls: {mode: STRICT}\n")
        + "---\n"
        + allow("greeter-callers", NAMESPACE)
        + "---\n"
        + allow("cart-callers", NAMESPACE, "{matchLabels: {app: cart}}")
    )
    summary, policies = check(
        config, {"POD_NAMESPACE": NAMESPACE, "ISTIO_METAJSON_LABELS": json.dumps(LABELS)}
    )
    assert summary.startswith("configuration OK: 1 listener(s)")
    assert policies == (
        "policies for namespace shop (labels app=greeter, version=v1; root namespace "
        "istio-system): PeerAuthentication STRICT; AuthorizationPolicy 1 ALLOW, 0 DENY, "
        "0 AUDIT; 1 not applied (see the info lines, or /config_dump policiesNotApplied)"
    )
    _, unknown = check(config, {})
    assert unknown.startswith(
        "policies: the workload's namespace is not known (POD_NAMESPACE, "
        "spec.telemetry.workload.namespace), so every policy in the files applies: "
        "PeerAuthentication STRICT; AuthorizationPolicy 2 ALLOW, 0 DENY, 0 AUDIT"
    ), unknown
    plain = tmp_path / "plain.yaml"
    plain.write_text(mesh([(1, "v1")]))
    assert len(check(plain, {"POD_NAMESPACE": NAMESPACE})) == 1  # no policies: one line


#: What ``kubectl get peerauthentication,authorizationpolicy -A -o yaml`` writes: one
#: ``List`` of the mesh's policies, with the metadata and status the API server adds.
KUBECTL_LIST = """\
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: default, namespace: istio-system, uid: 5b0d3c1e, resourceVersion: "12"}
  spec: {mtls: {mode: STRICT}}
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: greeter-callers, namespace: shop, generation: 1}
  spec:
    rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}]}]
  status: {}
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: elsewhere, namespace: other}
  spec: {}
"""


@pytest.mark.usefixtures("pod")
def test_the_mesh_policies_as_kubectl_lists_them(tmp_path: Path, ca: MeshCa) -> None:
    """The page's ``kubectl get ... -A -o yaml`` writes a ``List``: its items are read as
    documents (it was refused, ``unknown kind 'List'``), selected as any, and an error in one
    names its item."""
    cfg = load(tmp_path, ca, KUBECTL_LIST)
    assert cfg.proxy.peer_authentication is not None
    assert cfg.proxy.peer_authentication.mode == "STRICT"
    assert applied(cfg) == ("shop/greeter-callers",)
    assert any("elsewhere" in line for line in cfg.proxy.policies_not_applied)
    bad = KUBECTL_LIST.replace("mode: STRICT", "mode: STRICTEST")
    with pytest.raises(ConfigError, match=r"document \d+, item 1, PeerAuthentication/default"):
        load(tmp_path, ca, bad)
    with pytest.raises(ConfigError, match="a List's items must be a sequence"):
        load(tmp_path, ca, "apiVersion: v1\nkind: List\nitems: {}\n")
