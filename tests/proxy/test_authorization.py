"""Istio's AuthorizationPolicy on the engine's listeners: who may call (SPIFFE principals,
namespaces, addresses, ports) decided per connection, ``request.headers`` per request, in
Istio's order (DENY, then ALLOW), answered with the codec's own error reply. Real sockets on
127.0.0.1 with mutual TLS clients of several identities (the mesh PKI of ``mesh_pki``), the
KV codec and the Dubbo codec; and the configuration's checks."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
import textwrap
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import cast

import pytest
from mesh_pki import MeshCa
from proxy_kit import (
    ONEWAY,
    Client,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    mesh,
    run,
    until,
)

from metaprotocol_sdk import ConfigError, Metadata
from metaprotocol_sdk.cli.proxy import _policies_summary
from metaprotocol_sdk.filters import Filter, RequestContext
from metaprotocol_sdk.proxy import Engine, loads_config

LISTENER = "svc.test:9000"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "mesh.md"
GUIDE = re.compile(r'^```yaml title="authorization.yaml"\n(.*?)^```', re.S | re.M)


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


def policy(name: str, spec: str, namespace: str = "", dry_run: str = "") -> str:
    """An AuthorizationPolicy document (``spec`` a YAML block, or ``{}``; ``dry_run``: the
    ``istio.io/dry-run`` annotation's value, as written in YAML)."""
    ns = f", namespace: {namespace}" if namespace else ""
    if dry_run:
        ns += f", annotations: {{istio.io/dry-run: {dry_run}}}"
    body = " {}" if spec.strip() == "{}" else "\n" + textwrap.indent(textwrap.dedent(spec), "  ")
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}{ns}}}\nspec:{body}\n"
    )


def config(ca: MeshCa, tmp_path: Path, port: int, *policies: str, proxy: str = "") -> str:
    """The one-service mesh with the engine's identity (PERMISSIVE: mutual TLS and plain
    text on one port) and ``policies``."""
    certs = tmp_path / "certs"
    if not certs.exists():
        ca.write(certs, "engine")
    return mesh(
        [(port, "v1")],
        proxy=f"meshIdentity: {{directory: '{certs}'}}\n" + proxy,
        extra="---\n".join(policies),
    )


async def connect(engine: Engine, ca: MeshCa, tmp_path: Path, sa: str | None, ns: str = "default"):  # type: ignore[no-untyped-def]
    """A client of identity ``sa`` in namespace ``ns`` (``None``: plain text)."""
    if sa is None:
        return await Client.connect(address(engine))
    ctx = ca.client_context(tmp_path / ns, None)
    ctx.load_cert_chain(*ca.files(tmp_path / ns, sa, ns))
    return await Client.connect(address(engine), ssl=ctx)


def rbac(engine: Engine, policy: str, action: str, result: str) -> int:
    return engine.stats.get(
        "metaprotocol_rbac_total", listener=LISTENER, policy=policy, action=action, result=result
    )


def denied_replies(engine: Engine) -> int:
    return engine.stats.get(
        "metaprotocol_local_replies_total", listener=LISTENER, type="PermissionDenied"
    )


# -- sources --------------------------------------------------------------------------------


def test_an_allow_policy_lets_its_principals_in_and_answers_the_others_with_their_ids(
    ca: MeshCa, tmp_path: Path
) -> None:
    """ALLOW from one SPIFFE identity: its client is served; a client of another identity
    and a plain-text client (no principal) get the codec's error reply, PermissionDenied,
    with their own request ids, on the same open connection for every request; the
    decisions are counted per connection, the replies per request, the access log names
    what denied."""
    log = tmp_path / "access.log"
    allow = policy(
        "frontend-only",
        """\
        action: ALLOW
        rules:
          - from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}]
        """,
        namespace="meta",
    )

    async def main() -> None:
        up = await Upstream("v1").start()
        text = config(ca, tmp_path, up.port, allow, proxy=f"accessLog: {{path: '{log}'}}\n")
        async with engine_for(text) as engine:
            frontend = await connect(engine, ca, tmp_path, "frontend")
            intruder = await connect(engine, ca, tmp_path, "intruder")
            plain = await connect(engine, ca, tmp_path, None)
            assert error_type(await frontend.call("get", rid=7)) is None
            for client, rid in ((intruder, 11), (plain, 12), (intruder, 13)):
                reply = await client.call("get", rid=rid)
                assert (reply.request_id, error_type(reply)) == (rid, "PermissionDenied")
                assert reply.attributes.get("error-message") == "RBAC: access denied"
            assert rbac(engine, "meta/frontend-only", "ALLOW", "allowed") == 1
            assert rbac(engine, "none", "ALLOW", "denied") == 2  # two connections
            assert denied_replies(engine) == 3  # three requests
            for client in (frontend, intruder, plain):
                client.close()
        await up.close()
        assert len(up.received) == 1
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        denied = [line for line in lines if line["status"] == "PermissionDenied"]
        assert [line["request_id"] for line in denied] == [11, 12, 13]
        assert denied[0]["response_code_details"] == "rbac_access_denied_matched_policy[none]"
        # Who asked: the client certificate's SPIFFE id, none for the plain-text client.
        who = {line["request_id"]: line.get("source_principal") for line in lines}
        spiffe = "spiffe://cluster.local/ns/default/sa/"
        assert who == {7: spiffe + "frontend", 11: spiffe + "intruder", 12: None, 13: who[11]}

    run(main())


def test_deny_comes_before_allow_and_namespaces_are_the_principals(
    ca: MeshCa, tmp_path: Path
) -> None:
    """A DENY policy matching a namespace wins over an ALLOW policy every mesh client
    matches (``principals: ["*"]``, which a plain-text client does not: it has none)."""
    deny = policy(
        "no-sandbox",
        """\
        action: DENY
        rules: [{from: [{source: {namespaces: ["sand*"]}}]}]
        """,
    )
    allow = policy("mesh-only", "rules: [{from: [{source: {principals: ['*']}}]}]")

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, deny, allow)) as engine:
            ok = await connect(engine, ca, tmp_path, "frontend")
            boxed = await connect(engine, ca, tmp_path, "frontend", ns="sandbox")
            plain = await connect(engine, ca, tmp_path, None)
            assert error_type(await ok.call("get")) is None
            assert error_type(await boxed.call("get", rid=3)) == "PermissionDenied"
            assert error_type(await plain.call("get", rid=4)) == "PermissionDenied"
            assert rbac(engine, "no-sandbox", "DENY", "denied") == 1
            assert rbac(engine, "mesh-only", "ALLOW", "allowed") == 1
            assert rbac(engine, "none", "ALLOW", "denied") == 1
            for client in (ok, boxed, plain):
                client.close()
        await up.close()

    run(main())


@pytest.mark.parametrize(
    "spec,served",
    [
        ("action: DENY\nrules: [{from: [{source: {namespaces: [sandbox]}}]}]", False),
        ("action: DENY\nrules: [{from: [{source: {principals: ['*/sa/intruder']}}]}]", False),
        ("action: DENY\nrules: [{when: [{key: source.serviceAccount, values: [x/y]}]}]", False),
        ("action: DENY\nrules: [{from: [{source: {notNamespaces: [default]}}]}]", True),
        ("rules: [{from: [{source: {notPrincipals: ['*/ns/sandbox/sa/intruder']}}]}]", False),
        ("rules: [{from: [{source: {principals: ['*/ns/sandbox/sa/intruder']}}]}]", True),
        ("rules: [{from: [{source: {namespaces: [x]}}]}]", True),
    ],
)
def test_every_spiffe_uri_san_of_a_certificate_is_a_principal(
    ca: MeshCa, tmp_path: Path, spec: str, served: bool
) -> None:
    """A client certificate with several URI SANs (a non-SPIFFE one, a second SPIFFE id, one
    whose path names a namespace twice): as Envoy's RBAC matches every URI SAN, a value
    matches if it matches one of them (``principals`` and ``namespaces`` of a DENY rule deny
    it), a ``not`` field holds only if it matches none (the engine read the first SPIFFE id
    only: a DENY rule on the others was bypassed)."""
    uris = (
        "https://example.com/x",
        "spiffe://cluster.local/ns/sandbox/sa/intruder",
        "spiffe://cluster.local/ns/a/sa/b/ns/x/sa/y",
    )

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, policy("p", spec))) as engine:
            ctx = ca.client_context(tmp_path / "multi", None)
            ctx.load_cert_chain(*ca.files(tmp_path / "multi", "frontend", uris=uris))
            client = await Client.connect(address(engine), ssl=ctx)
            reply = await client.call("get", rid=5)
            assert reply.request_id == 5
            assert error_type(reply) == (None if served else "PermissionDenied"), spec
            client.close()
        await up.close()

    run(main())


@pytest.mark.parametrize(
    "spec,served",
    [
        ("{}", False),  # Istio's allow-nothing: an ALLOW policy without rules
        ("rules: [{}]", True),  # allow-all: an empty rule matches everything
        ("action: DENY\nrules: [{}]", False),  # deny-all
        ("action: DENY", True),  # a DENY policy without rules matches nothing
        ("action: AUDIT\nrules: [{}]", True),  # AUDIT only counts
    ],
)
def test_istios_empty_policies(ca: MeshCa, tmp_path: Path, spec: str, served: bool) -> None:
    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, policy("p", spec))) as engine:
            client = await connect(engine, ca, tmp_path, "frontend")
            reply = await client.call("get", rid=9)
            assert reply.request_id == 9
            assert error_type(reply) == (None if served else "PermissionDenied")
            if "AUDIT" in spec:
                assert rbac(engine, "p", "AUDIT", "audited") == 1
            client.close()
        await up.close()

    run(main())


def test_ip_blocks_and_ports_of_the_connection(ca: MeshCa, tmp_path: Path) -> None:
    """``ipBlocks`` and ``remoteIpBlocks`` (the peer's address: no PROXY protocol here), a
    bad match of either, and ``to.operation.ports`` (the port the connection came to),
    given by a reload once the listener's port is known."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            port = address(engine)[1]
            cases = [
                ("rules: [{from: [{source: {ipBlocks: [127.0.0.0/8]}}]}]", True),
                ("rules: [{from: [{source: {ipBlocks: [10.0.0.1]}}]}]", False),
                ("rules: [{from: [{source: {remoteIpBlocks: [127.0.0.1]}}]}]", True),
                ("rules: [{from: [{source: {notRemoteIpBlocks: [127.0.0.1/32]}}]}]", False),
                (f"rules: [{{to: [{{operation: {{ports: ['{port}']}}}}]}}]", True),
                (f"rules: [{{to: [{{operation: {{notPorts: [{port}]}}}}]}}]", False),
                (f"rules: [{{when: [{{key: destination.port, values: ['{port}']}}]}}]", True),
                ("rules: [{when: [{key: source.ip, notValues: [127.0.0.0/8]}]}]", False),
                # IPv4-mapped IPv6 blocks are the IPv4 ones (peers' mapped addresses are)
                ("rules: [{from: [{source: {ipBlocks: ['::ffff:127.0.0.1']}}]}]", True),
                ("rules: [{from: [{source: {notIpBlocks: ['::ffff:127.0.0.0/104']}}]}]", False),
                ("rules: [{when: [{key: remote.ip, values: ['::ffff:7f00:0/120']}]}]", True),
                ("rules: [{from: [{source: {ipBlocks: ['::1']}}]}]", False),
            ]
            for spec, served in cases:
                await engine.apply(loads_config(config(ca, tmp_path, up.port, policy("p", spec))))
                client = await connect(engine, ca, tmp_path, None)
                got = error_type(await client.call("get"))
                assert got == (None if served else "PermissionDenied"), spec
                client.close()
        await up.close()

    run(main())


def test_when_conditions_of_the_connection(ca: MeshCa, tmp_path: Path) -> None:
    """``source.principal``, ``source.namespace`` and ``source.serviceAccount`` conditions
    with values and notValues, Istio's ``*`` prefix and suffix matching."""
    allow = policy(
        "p",
        """\
        rules:
          - when:
              - key: source.principal
                values: ["*/sa/frontdoor", "cluster.local/ns/kube-system/sa/front*",
                         "cluster.local/ns/default/sa/front*"]
              - {key: source.namespace, notValues: [kube-system]}
          - when: [{key: source.serviceAccount, values: [ops/admin]}]
        """,
    )

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, allow)) as engine:
            for sa, ns, served in (
                ("frontend", "default", True),
                ("frontdoor", "other", True),
                ("frontend", "kube-system", False),
                ("backend", "default", False),
                ("admin", "ops", True),
                ("admin", "default", False),
            ):
                client = await connect(engine, ca, tmp_path, sa, ns)
                got = error_type(await client.call("get"))
                assert got == (None if served else "PermissionDenied"), (sa, ns)
                client.close()
        await up.close()

    run(main())


def test_connection_sni_is_the_server_name_the_client_sent(ca: MeshCa, tmp_path: Path) -> None:
    """``connection.sni``: the name a sidecar sends (Istio's ``outbound_.PORT_._.HOST``);
    a client that sent another, or none (plain text), does not match."""
    allow = policy("sni", "rules: [{when: [{key: connection.sni, values: ['outbound_.9000_*']}]}]")

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, allow)) as engine:
            for name, served in (("outbound_.9000_._.svc.test", True), ("svc.test", False)):
                ctx = ca.client_context(tmp_path, "frontend")
                client = await Client.connect(address(engine), ssl=ctx, server_hostname=name)
                got = error_type(await client.call("get"))
                assert got == (None if served else "PermissionDenied"), name
                client.close()
            plain = await connect(engine, ca, tmp_path, None)
            assert error_type(await plain.call("get")) == "PermissionDenied"
            plain.close()
        await up.close()

    run(main())


# -- request attributes (request.headers) ---------------------------------------------------


def test_request_headers_are_the_requests_attributes_judged_per_request(
    ca: MeshCa, tmp_path: Path
) -> None:
    """``request.headers[KEY]`` reads the request's attribute KEY (case-insensitive): one
    connection's requests are allowed or denied one by one; a DENY on an attribute's
    presence (``*``) wins; a one-way message denied is counted, not answered."""
    deny = policy(
        "no-debug",
        "action: DENY\nrules: [{when: [{key: 'request.headers[X-Debug]', values: ['*']}]}]",
    )
    allow = policy(
        "users",
        """\
        rules:
          - from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}]
            when: [{key: "request.headers[user]", values: [alice, "adm*"]}]
        """,
    )

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, deny, allow)) as engine:
            client = await connect(engine, ca, tmp_path, "frontend")
            other = await connect(engine, ca, tmp_path, "backend")
            cases = [
                ({"user": "alice"}, None),
                ({"User": "admin-1"}, None),
                ({"user": "bob"}, "PermissionDenied"),
                ({}, "PermissionDenied"),
                ({"user": "alice", "x-debug": "1"}, "PermissionDenied"),
            ]
            for rid, (headers, want) in enumerate(cases, 1):
                reply = await client.call("get", headers, rid=rid)
                assert (reply.request_id, error_type(reply)) == (rid, want), headers
            # Another identity never matches the ALLOW rule: denied at the connection.
            assert error_type(await other.call("get", {"user": "alice"})) == "PermissionDenied"
            assert rbac(engine, "users", "ALLOW", "allowed") == 2
            assert rbac(engine, "none", "ALLOW", "denied") == 3  # 2 requests, 1 connection
            assert rbac(engine, "no-debug", "DENY", "denied") == 1
            client.send(build_frame(ONEWAY, 99, {"method": "get", "user": "bob"}))
            assert error_type(await client.call("get", {"user": "alice"})) is None
            oneway = engine.stats.total("metaprotocol_oneway_total", status="PermissionDenied")
            assert oneway == 1
            client.close()
            other.close()
        await up.close()
        assert len(up.received) == 3

    run(main())


# -- the guide's example ------------------------------------------------------------------


def test_the_mesh_guides_authorization_example_does_what_the_page_says(
    ca: MeshCa, tmp_path: Path
) -> None:
    """docs/mesh.md's ``authorization.yaml``, as written, on the KV codec: the gateway's
    namespace and web/frontend are let in; a sandbox namespace, another identity, a plain
    client and a request with a ``debug`` attribute are not; the series and the dump are
    the ones the page names."""
    (example,) = GUIDE.findall(PAGE.read_text(encoding="utf-8"))

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, example)) as engine:
            for sa, ns, served in (
                ("thrift-client", "meta-thrift", True),
                ("frontend", "web", True),
                ("frontend", "sandbox-7", False),
                ("backend", "web", False),
                (None, "", False),
            ):
                client = await connect(engine, ca, tmp_path, sa, ns or "default")
                reply = await client.call("sayHello", rid=21)
                assert reply.request_id == 21
                assert error_type(reply) == (None if served else "PermissionDenied"), (sa, ns)
                if served:
                    debug = await client.call("sayHello", {"debug": "1"})
                    assert error_type(debug) == "PermissionDenied"
                client.close()
            assert rbac(engine, "meta-thrift/no-sandbox", "DENY", "denied") == 3
            assert rbac(engine, "meta-thrift/thrift-gateway-callers", "ALLOW", "allowed") == 2
            assert rbac(engine, "none", "ALLOW", "denied") == 2
            assert engine.config_dump()["authorizationPolicies"] == {
                "DENY": ["meta-thrift/no-sandbox"],
                "ALLOW": ["meta-thrift/thrift-gateway-callers"],
                "AUDIT": [],
            }
        await up.close()

    run(main())


# -- dry run (istio.io/dry-run) ------------------------------------------------------------


def rbac_series(engine: Engine) -> dict[str, int]:
    """Every ``metaprotocol_rbac_total`` series and its value."""
    snapshot = engine.stats.snapshot()
    return {k: v for k, v in snapshot.items() if k.startswith("metaprotocol_rbac_total{")}


def test_a_dry_run_deny_all_lets_every_request_through_and_counts_its_denials(
    ca: MeshCa, tmp_path: Path
) -> None:
    """A DENY-all policy in dry run (an operator's first step) denies nothing: every client
    is served; each connection is counted ``shadow_denied`` once, and allowed connections
    cost their requests nothing (no verdict). A dry-run rule on ``request.headers`` is
    judged per request. (Before, the annotation was ignored: every request was denied.)"""
    deny_all = policy("deny-all", "action: DENY\nrules: [{}]", dry_run='"true"')
    no_debug = policy(
        "no-debug",
        "action: DENY\nrules: [{when: [{key: 'request.headers[debug]', values: ['*']}]}]",
        dry_run='"true"',
    )

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, deny_all)) as engine:
            mtls = await connect(engine, ca, tmp_path, "frontend")
            plain = await connect(engine, ca, tmp_path, None)
            for client in (mtls, plain, mtls):
                assert error_type(await client.call("get")) is None
            assert rbac(engine, "deny-all", "DENY", "shadow_denied") == 2  # two connections
            assert rbac(engine, "none", "ALLOW", "allowed") == 2  # enforced: nothing applies
            assert denied_replies(engine) == 0
            assert rbac(engine, "deny-all", "DENY", "denied") == 0
            assert [c.authz for c in engine.downstreams] == [None, None]
            dump = engine.config_dump()
            assert dump["authorizationPolicies"] == {"DENY": [], "ALLOW": [], "AUDIT": []}
            assert dump["authorizationPoliciesDryRun"] == {"DENY": ["deny-all"], "ALLOW": []}
            mtls.close()
            plain.close()
        async with engine_for(config(ca, tmp_path, up.port, no_debug)) as engine:
            client = await connect(engine, ca, tmp_path, "frontend")
            for headers in ({}, {"debug": "1"}, {"Debug": "2"}, {"user": "x"}):
                assert error_type(await client.call("get", headers)) is None, headers
            assert rbac(engine, "no-debug", "DENY", "shadow_denied") == 2
            assert rbac(engine, "none", "DENY", "shadow_allowed") == 2
            assert rbac(engine, "none", "ALLOW", "allowed") == 1  # the connection, once
            assert denied_replies(engine) == 0
            client.close()
        await up.close()
        assert len(up.received) == 7

    run(main())


def test_a_dry_run_allow_counts_the_connections_and_requests_it_would_deny(
    ca: MeshCa, tmp_path: Path
) -> None:
    """A dry-run ALLOW policy (frontend only, and for it the requests of user alice) lets
    everyone in and counts: ``shadow_allowed`` for the requests it would let in,
    ``shadow_denied`` (policy ``none``) for the connections and requests it would deny."""
    allow = policy(
        "frontend-alice",
        """\
        rules:
          - from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}]
            when: [{key: "request.headers[user]", values: [alice]}]
        """,
        dry_run='"true"',
    )

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port, allow)) as engine:
            frontend = await connect(engine, ca, tmp_path, "frontend")
            intruder = await connect(engine, ca, tmp_path, "intruder")
            plain = await connect(engine, ca, tmp_path, None)
            for user in ("alice", "bob", "alice"):
                assert error_type(await frontend.call("get", {"user": user})) is None
            for client in (intruder, plain, intruder):
                assert error_type(await client.call("get", {"user": "alice"})) is None
            assert rbac(engine, "frontend-alice", "ALLOW", "shadow_allowed") == 2
            # bob's request, and the two other connections (once each).
            assert rbac(engine, "none", "ALLOW", "shadow_denied") == 3
            assert rbac(engine, "none", "ALLOW", "allowed") == 3  # enforced: no ALLOW policy
            assert denied_replies(engine) == 0
            for client in (frontend, intruder, plain):
                client.close()
        await up.close()
        assert len(up.received) == 6

    run(main())


def test_the_access_log_says_what_the_dry_run_policies_would_do_to_each_request(
    ca: MeshCa, tmp_path: Path
) -> None:
    """With an access log, each line carries each dry-run set's decision for its request
    (Istio's ``istio_dry_run_*_shadow_*`` metadata): the DENY set's for every request, the
    ALLOW set's where the enforced DENY policies let the request through; decided per
    connection or per request alike, and counted as without the log."""
    log = tmp_path / "access.log"
    no_debug = policy(
        "no-debug",
        "action: DENY\nrules: [{when: [{key: 'request.headers[debug]', values: ['*']}]}]",
        dry_run='"true"',
    )
    frontend_alice = policy(
        "frontend-alice",
        """\
        rules:
          - from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}]
            when: [{key: "request.headers[user]", values: [alice]}]
        """,
        dry_run='"true"',
    )
    no_sandbox = policy(
        "no-sandbox", "action: DENY\nrules: [{from: [{source: {namespaces: [sandbox]}}]}]"
    )
    deny_all = policy("deny-all", "action: DENY\nrules: [{}]", dry_run='"true"')
    proxy = f"accessLog: {{path: '{log}'}}\n"

    def lines() -> dict[int, dict[str, object]]:
        records = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        return {r["request_id"]: r for r in records}

    async def main() -> None:
        up = await Upstream("v1").start()
        text = config(ca, tmp_path, up.port, no_debug, frontend_alice, no_sandbox, proxy=proxy)
        async with engine_for(text) as engine:
            frontend = await connect(engine, ca, tmp_path, "frontend")
            assert error_type(await frontend.call("get", {"user": "alice"}, rid=1)) is None
            assert (
                error_type(await frontend.call("get", {"user": "bob", "Debug": "1"}, rid=2)) is None
            )
            intruder = await connect(engine, ca, tmp_path, "intruder")
            assert error_type(await intruder.call("get", {"user": "alice"}, rid=3)) is None
            sandbox = await connect(engine, ca, tmp_path, "frontend", "sandbox")
            assert (
                error_type(await sandbox.call("get", {"user": "alice"}, rid=4))
                == "PermissionDenied"
            )
            assert rbac(engine, "no-debug", "DENY", "shadow_denied") == 1
            assert rbac(engine, "frontend-alice", "ALLOW", "shadow_allowed") == 1
            for client in (frontend, intruder, sandbox):
                client.close()
        outcome = {rid: line.get("dry_run") for rid, line in lines().items()}
        allowed, denied = "allowed", "denied"
        assert outcome == {
            1: {
                "deny": {"result": allowed, "policy": "none"},
                "allow": {"result": allowed, "policy": "frontend-alice"},
            },
            2: {
                "deny": {"result": denied, "policy": "no-debug"},
                "allow": {"result": denied, "policy": "none"},
            },
            3: {  # the ALLOW set decided for the connection: its principal matches no rule
                "deny": {"result": allowed, "policy": "none"},
                "allow": {"result": denied, "policy": "none"},
            },
            # denied by the enforced DENY policy: the ALLOW set never judges it
            4: {"deny": {"result": allowed, "policy": "none"}},
        }
        # A set decided once for the connection (no per-request rules): every line says so,
        # and the counts are those without an access log (once per connection).
        async with engine_for(config(ca, tmp_path, up.port, deny_all, proxy=proxy)) as engine:
            client = await connect(engine, ca, tmp_path, "frontend")
            for rid in (5, 6):
                assert error_type(await client.call("get", rid=rid)) is None
            assert rbac(engine, "deny-all", "DENY", "shadow_denied") == 1
            assert rbac(engine, "none", "ALLOW", "allowed") == 1
            client.close()
        outcome = {rid: line.get("dry_run") for rid, line in lines().items()}
        assert outcome == {
            rid: {"deny": {"result": denied, "policy": "deny-all"}} for rid in (5, 6)
        }
        # No dry-run policy: no such field.
        async with engine_for(config(ca, tmp_path, up.port, no_sandbox, proxy=proxy)) as engine:
            client = await connect(engine, ca, tmp_path, "frontend")
            assert error_type(await client.call("get", rid=7)) is None
            client.close()
        assert "dry_run" not in lines()[7]
        await up.close()

    run(main())


@pytest.mark.parametrize("headers", [False, True])
def test_enforced_policies_next_to_dry_run_ones_behave_as_if_those_did_not_exist(
    ca: MeshCa, tmp_path: Path, headers: bool
) -> None:
    """Enforced DENY (sandbox; with ``headers``, also any ``debug`` request) and ALLOW
    (frontend only) policies, alone and next to dry-run policies that would deny
    everything (DENY-all, allow-nothing) or allow everything: the same replies to the same
    requests, the same enforced series. The dry-run ALLOW set is judged only where the
    enforced DENY policies let a connection or request through (as Istio's ALLOW filter)."""
    when = "\n  - when: [{key: 'request.headers[debug]', values: ['*']}]" if headers else ""
    sandbox = "\n  - from: [{source: {namespaces: [sandbox]}}]"
    enforced = [
        policy("no-sandbox", f"action: DENY\nrules:{sandbox}{when}"),
        policy("frontend", "rules: [{from: [{source: {principals: ['*/sa/frontend']}}]}]"),
    ]
    dry = [
        policy("dry-deny-all", "action: DENY\nrules: [{}]", dry_run='"true"'),
        policy("dry-allow-nothing", "{}", dry_run="'True'"),
        policy("dry-allow-all", "rules: [{}]", dry_run='"1"'),
        # (quoted: YAML reads a bare off as false, which is not a name)
        policy('"off"', "action: DENY\nrules: [{}]", dry_run='"false"'),
    ]
    calls = [
        ("frontend", "default", {}),
        ("frontend", "default", {"debug": "1"}),
        ("intruder", "default", {}),
        ("frontend", "sandbox", {}),
        (None, "default", {}),
    ]

    async def scenario(policies: list[str]) -> tuple[list[str | None], dict[str, int]]:
        up = await Upstream("v1").start()
        replies: list[str | None] = []
        async with engine_for(config(ca, tmp_path, up.port, *policies)) as engine:
            for sa, ns, attrs in calls:
                client = await connect(engine, ca, tmp_path, sa, ns)
                replies.append(error_type(await client.call("get", attrs)))
                replies.append(error_type(await client.call("get")))
                client.close()
            series = rbac_series(engine)
        await up.close()
        return replies, series

    async def main() -> None:
        alone, alone_series = await scenario(enforced)
        along, along_series = await scenario(dry[:3] + enforced)
        assert along == alone
        assert "PermissionDenied" in alone and None in alone
        shadow = {k: v for k, v in along_series.items() if "shadow" in k}
        assert {k: v for k, v in along_series.items() if k not in shadow} == alone_series
        # The policy "off" (dry-run "false") is enforced: a second run with it denies all.
        every = await scenario([dry[3]])
        assert every[0] == ["PermissionDenied"] * len(every[0])

        def count(name: str, action: str, result: str) -> int:
            return sum(
                v
                for k, v in shadow.items()
                if f'policy="{name}"' in k and f'action="{action}"' in k and f'"{result}"' in k
            )

        assert count("dry-deny-all", "DENY", "shadow_denied") == len(calls)  # per connection
        # The ALLOW set (its first matching policy, allow-all) is not judged for the
        # sandbox connection, which a DENY policy denied. With `headers`, the frontend's
        # requests are judged one by one, after the enforced DENY rules (3 of 4 pass);
        # the intruder's and the plain connections, denied by the enforced ALLOW policy,
        # are counted once each.
        allowed = count("dry-allow-all", "ALLOW", "shadow_allowed")
        assert allowed == (3 + 2 if headers else 4)

    run(main())


def test_dry_run_policies_of_a_connection_denied_by_an_allow_policy_are_judged(
    ca: MeshCa, tmp_path: Path
) -> None:
    """A connection no enforced ALLOW rule matches is denied; both dry-run sets still judge
    it (Istio's ALLOW filter runs its shadow rules before its own), per request where
    their rules read ``request.headers``."""
    allow = policy("frontend", "rules: [{from: [{source: {principals: ['*/sa/frontend']}}]}]")
    dry_deny = policy(
        "dry-debug",
        "action: DENY\nrules: [{when: [{key: 'request.headers[debug]', values: ['*']}]}]",
        dry_run='"true"',
    )
    dry_allow = policy(
        "dry-alice",
        "rules: [{when: [{key: 'request.headers[user]', values: [alice]}]}]",
        dry_run='"true"',
    )

    async def main() -> None:
        up = await Upstream("v1").start()
        text = config(ca, tmp_path, up.port, allow, dry_deny, dry_allow)
        async with engine_for(text) as engine:
            intruder = await connect(engine, ca, tmp_path, "intruder")
            for attrs in ({"user": "alice"}, {"debug": "1"}):
                assert error_type(await intruder.call("get", attrs)) == "PermissionDenied"
            assert rbac(engine, "none", "ALLOW", "denied") == 1  # once, the connection
            assert rbac(engine, "dry-debug", "DENY", "shadow_denied") == 1
            assert rbac(engine, "none", "DENY", "shadow_allowed") == 1
            assert rbac(engine, "dry-alice", "ALLOW", "shadow_allowed") == 1
            assert rbac(engine, "none", "ALLOW", "shadow_denied") == 1
            intruder.close()
        await up.close()
        assert not up.received

    run(main())


# -- reload --------------------------------------------------------------------------------


def test_a_reload_applies_new_policies_to_open_connections(ca: MeshCa, tmp_path: Path) -> None:
    """Policies change on reload like routes: an open connection's next request is judged
    by the new ones; without any, nothing is judged."""
    deny = policy("deny-all", "action: DENY\nrules: [{}]")

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            runtime = engine.listeners[("svc.test", 9000)]
            assert runtime.authz is None
            client = await connect(engine, ca, tmp_path, "frontend")
            (conn,) = engine.downstreams
            assert conn.authz is None
            assert error_type(await client.call("get")) is None
            await engine.apply(loads_config(config(ca, tmp_path, up.port, deny)))
            assert error_type(await client.call("get", rid=5)) == "PermissionDenied"
            assert engine.config_dump()["authorizationPolicies"]["DENY"] == ["deny-all"]
            await engine.apply(loads_config(config(ca, tmp_path, up.port)))
            assert error_type(await client.call("get")) is None
            assert conn.authz is None and runtime.authz is None
            client.close()
        await up.close()

    run(main())


class Gate(Filter):
    """Holds every request until ``gate`` is set (``holding`` set when one is held)."""

    name = "gate"
    gate: asyncio.Event | None = None
    holding: asyncio.Event | None = None

    def on_request(self, context: RequestContext) -> Awaitable[object] | None:
        assert Gate.gate is not None and Gate.holding is not None
        Gate.holding.set()
        return Gate.gate.wait()


def test_a_reload_judges_requests_a_filter_held_across_it(ca: MeshCa, tmp_path: Path) -> None:
    """A request a filter holds when a reload denies its connection is judged by the new
    policies when the filter lets it go: answered PermissionDenied with its id, never sent
    (it was judged once, before the filter, and then sent under the old policies); a reload
    that keeps the policies lets a held request through."""
    deny = policy("deny-all", "action: DENY\nrules: [{}]")

    def text(port: int, *policies: str) -> str:
        certs = tmp_path / "certs"
        if not certs.exists():
            ca.write(certs, "engine")
        return mesh(
            [(port, "v1")],
            proxy=f"meshIdentity: {{directory: '{certs}'}}\n",
            extra="---\n".join(policies),
            # This module's own name: another test module importing this one makes a second
            # copy of it (pytest's importlib mode), with a Gate of its own.
            listener=f"filters: [{{name: '{__name__}:Gate'}}]",
        )

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(text(up.port)) as engine:
            client = await connect(engine, ca, tmp_path, "frontend")
            for policies, served in (((), True), ((deny,), False)):
                Gate.gate, Gate.holding = asyncio.Event(), asyncio.Event()
                held = client.start("get", rid=21)
                await asyncio.wait_for(Gate.holding.wait(), 5)
                await engine.apply(loads_config(text(up.port, *policies)))
                Gate.gate.set()
                reply = await asyncio.wait_for(held, 5)
                assert reply.request_id == 21
                assert error_type(reply) == (None if served else "PermissionDenied")
            assert denied_replies(engine) == 1
            assert rbac(engine, "deny-all", "DENY", "denied") == 1
            client.close()
        await up.close()
        assert len(up.received) == 1

    run(main())


# -- another codec's error reply -----------------------------------------------------------


class DubboServer(asyncio.Protocol):
    """A Dubbo provider answering every request ``"ok"`` with its id."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        from metaprotocol_dubbo.frames import build_response

        self.buffer += data
        while len(self.buffer) >= 16:
            size = 16 + struct.unpack_from("!I", self.buffer, 12)[0]
            if len(self.buffer) < size:
                return
            (rid,) = struct.unpack_from("!q", self.buffer, 4)
            del self.buffer[:size]
            self.transport.write(build_response("ok", request_id=rid))


async def dubbo_call(port: int, rid: int, attachments: dict[str, str]) -> tuple[int, int, bytes]:
    """One Dubbo request: the reply's id, status and body."""
    from metaprotocol_dubbo.frames import build_request

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            build_request("org.x.Greeter", "greet", ["a"], request_id=rid, attachments=attachments)
        )
        head = await asyncio.wait_for(reader.readexactly(16), 5)
        body = await asyncio.wait_for(reader.readexactly(struct.unpack_from("!I", head, 12)[0]), 5)
    finally:
        writer.close()
    return struct.unpack_from("!q", head, 4)[0], head[3], body


def test_a_denied_dubbo_request_gets_dubbos_error_reply_with_its_id() -> None:
    """No mesh identity needed for addresses and attachments: a Dubbo consumer is denied by
    an attachment (``request.headers``) with Dubbo's BAD_REQUEST status and its own id."""
    deny = policy(
        "no-guests",
        "action: DENY\nrules: [{when: [{key: 'request.headers[user]', values: [guest]}]}]",
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(DubboServer, "127.0.0.1", 0)
        up = server.sockets[0].getsockname()[1]
        text = mesh(
            [(up, "v1")],
            protocol="dubbo",
            codec="aeraki.meta_protocol.codec.dubbo",
            extra=deny,
        )
        async with engine_for(text) as engine:
            port = address(engine)[1]
            rid, status, body = await dubbo_call(port, 2**40 + 7, {"user": "guest"})
            assert (rid, status) == (2**40 + 7, 40)
            assert b"PermissionDenied: RBAC: access denied" in body, body
            rid, status, body = await dubbo_call(port, 8, {"user": "alice"})
            assert (rid, status, body) == (8, 20, b"\x91\x02ok")
        server.close()
        await server.wait_closed()

    run(main())


def test_a_case_variant_of_a_denied_attachment_cannot_slip_past_the_deny() -> None:
    """Attributes ignore case and keep one value per key; the provider's attachments map does
    not. ``{"user": "admin", "USER": "bob"}`` was judged as ``user=bob`` (the later key won)
    and forwarded to a provider that reads ``user=admin``. The codec refuses such a request:
    the client gets Dubbo's BAD_REQUEST reply with its id, nothing reaches the provider, and
    the refusal is counted as a BadRequest local reply and a decode error."""
    deny = policy(
        "no-admin",
        "action: DENY\nrules: [{when: [{key: 'request.headers[user]', values: [admin]}]}]",
    )
    served: list[bytes] = []

    class Recording(DubboServer):
        def data_received(self, data: bytes) -> None:
            served.append(data)
            super().data_received(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Recording, "127.0.0.1", 0)
        up = server.sockets[0].getsockname()[1]
        text = mesh(
            [(up, "v1")], protocol="dubbo", codec="aeraki.meta_protocol.codec.dubbo", extra=deny
        )
        async with engine_for(text) as engine:
            port = address(engine)[1]
            rid, status, body = await dubbo_call(port, 2**40 + 9, {"user": "admin", "USER": "bob"})
            assert (rid, status) == (2**40 + 9, 40)
            assert b"BadRequest" in body and b"differ only in case" in body, body
            assert not served
            rid, status, body = await dubbo_call(port, 10, {"user": "admin"})
            assert (rid, status) == (10, 40) and b"PermissionDenied" in body
            rid, status, body = await dubbo_call(port, 11, {"USER": "bob"})
            assert (rid, status, body) == (11, 20, b"\x91\x02ok")
            stats = engine.stats
            assert stats.total("metaprotocol_local_replies_total", type="BadRequest") == 1
            assert stats.total("metaprotocol_decode_errors_total") == 1
        server.close()
        await server.wait_closed()

    run(main())


def test_a_route_mutation_replaces_a_case_variant_through_a_second_engine() -> None:
    """A route writing ``user: x`` onto a request carrying ``User: admin`` sent both keys
    (the mutation matched keys exactly): the inbound engine behind it refused the request as
    ambiguous (BAD_REQUEST) and a provider would have read two attachments. The mutation
    replaces the variant: the provider behind both engines sees ``user: x`` only."""
    from metaprotocol_dubbo import DubboCodec

    served: list[bytes] = []

    class Recording(DubboServer):
        def data_received(self, data: bytes) -> None:
            served.append(data)
            super().data_received(data)

    router = """\
    - name: mutate
      route: [{destination: {host: svc.test}}]
      requestMutation: [{key: user, value: x}]
    """
    dubbo = {"protocol": "dubbo", "codec": "aeraki.meta_protocol.codec.dubbo"}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Recording, "127.0.0.1", 0)
        up = server.sockets[0].getsockname()[1]
        async with engine_for(mesh([(up, "v1")], **dubbo)) as inbound:
            text = mesh([(address(inbound)[1], "v1")], router=router, **dubbo)
            async with engine_for(text) as outbound:
                port = address(outbound)[1]
                rid, status, body = await dubbo_call(port, 12, {"User": "admin", "k": "v"})
                assert (rid, status, body) == (12, 20, b"\x91\x02ok"), body
                assert inbound.stats.total("metaprotocol_decode_errors_total") == 0
        server.close()
        await server.wait_closed()
        frame = b"".join(served)
        buffer = bytearray(frame)
        request = DubboCodec().decode(buffer)  # refused if it held both keys
        assert isinstance(request, Metadata) and not buffer and request.attributes["user"] == "x"
        assert b"User" not in frame and b"admin" not in frame and frame.count(b"\x04user") == 1

    run(main())


# -- cost ----------------------------------------------------------------------------------


def test_without_policies_nothing_is_judged(ca: MeshCa, tmp_path: Path) -> None:
    """No AuthorizationPolicy: no listener has policies and no connection a verdict (the
    request path reads one attribute, ``None``); an allowed connection of a listener with
    connection-level policies has none either."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            client = await connect(engine, ca, tmp_path, "frontend")
            assert error_type(await client.call("get")) is None
            assert engine.listeners[("svc.test", 9000)].authz is None
            assert [c.authz for c in engine.downstreams] == [None]
            assert not engine.stats.counters("metaprotocol_rbac_total")
            client.close()
        allow = policy("p", "rules: [{from: [{source: {principals: ['*']}}]}]")
        async with engine_for(config(ca, tmp_path, up.port, allow)) as engine:
            client = await connect(engine, ca, tmp_path, "frontend")
            assert error_type(await client.call("get")) is None
            await until(lambda: engine.downstreams, "the connection")
            assert [c.authz for c in engine.downstreams] == [None]
            client.close()
        await up.close()

    run(main())


# -- configuration -------------------------------------------------------------------------


def load_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        loads_config(text, "test.yaml")
    return caught.value


def plain(*policies: str) -> str:
    return mesh([(1, "v1")], extra="---\n".join(policies))


@pytest.mark.parametrize(
    "spec,field,words",
    [
        ("action: CUSTOM\nprovider: {name: ext}", "spec.provider", "ext-authz"),
        ("action: CUSTOM", "spec.action", "external authorization service"),
        ("action: REJECT", "spec.action", "unknown action 'REJECT'"),
        (
            "targetRefs: [{kind: Gateway, name: gw}]",
            "spec.targetRefs",
            "have such a policy skipped",
        ),
        (
            "rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}}]}]",
            "spec.rules[0].from[0].source.ipBlocks[1]",
            "'10.0.0.0/33' is not an IP address or a CIDR block",
        ),
        (
            "rules: [{when: [{key: remote.ip, values: [not-an-ip]}]}]",
            "spec.rules[0].when[0].values[0]",
            "not an IP address",
        ),
        (
            "rules: [{to: [{operation: {ports: ['70000']}}]}]",
            "spec.rules[0].to[0].operation.ports[0]",
            "port number",
        ),
        (
            "rules: [{from: [{source: {principals: ['a*b']}}]}]",
            "spec.rules[0].from[0].source.principals[0]",
            "'*' is allowed only alone, as a prefix or as a suffix",
        ),
        (
            "rules: [{when: [{key: request.time, values: [x]}]}]",
            "spec.rules[0].when[0].key",
            "unknown or unsupported key 'request.time'",
        ),
        (
            "rules: [{when: [{key: 'request.headers[]', values: [x]}]}]",
            "spec.rules[0].when[0].key",
            "expected request.headers[NAME]",
        ),
        ("rules: [{when: [{key: source.ip}]}]", "spec.rules[0].when[0]", "values or notValues"),
        ("rules: [{from: [{}]}]", "spec.rules[0].from[0].source", "required"),
        ("rules: [{from: [{source: {}}]}]", "spec.rules[0].from[0].source", "must not be empty"),
        (
            "rules: [{from: [{source: {principal: [x]}}]}]",
            "spec.rules[0].from[0].source.principal",
            "unknown field",
        ),
        (
            "rules: [{from: [{source: {serviceAccounts: [admin]}}]}]",
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "namespace/serviceaccount",
        ),
    ],
)
def test_a_bad_policy_is_one_readable_error(spec: str, field: str, words: str) -> None:
    exc = load_error(plain(policy("bad", spec)))
    assert exc.field == field, str(exc)
    assert words in str(exc) and "AuthorizationPolicy/bad" in str(exc)
    assert "\n" not in str(exc)


@pytest.mark.parametrize(
    "spec,value,words",
    [
        ("action: DENY", "'yes'", 'must be "true" or "false", got \'yes\''),
        ("action: DENY", "yes", "got True (not a string: an annotation's value is one, quote"),
        ("action: DENY", "''", 'must be "true" or "false", got \'\''),
        ("action: DENY", "1", "got 1 (not a string"),
        ("action: AUDIT\nrules: [{}]", '"true"', "ALLOW and DENY policies only"),
        ("action: AUDIT\nrules: [{}]", '"false"', "ALLOW and DENY policies only"),
    ],
)
def test_a_bad_dry_run_annotation_is_one_readable_error(spec: str, value: str, words: str) -> None:
    """``istio.io/dry-run`` is a string istiod reads as a boolean, on ALLOW and DENY policies
    only (Istio's validation); anything else is refused, not taken as enforced."""
    exc = load_error(plain(policy("bad", spec, dry_run=value)))
    assert exc.field == "metadata.annotations.istio.io/dry-run", str(exc)
    assert words in str(exc) and "AuthorizationPolicy/bad" in str(exc)


def test_dry_run_policies_are_set_apart_and_other_annotations_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Go's ParseBool spellings, as istiod reads them; a policy's other annotations are
    logged once as ignored; the names stay unique across both sets."""
    text = plain(
        policy("a", "rules: [{}]", dry_run='"T"'),
        policy("d", "action: DENY\nrules: [{}]", dry_run="'0'"),
        policy("x", "action: DENY\nrules: [{}]").replace(
            "name: x}", "name: x, annotations: {team: a, owner: b, istio.io/dry-run: 'TRUE'}}"
        ),
    )
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        loaded = loads_config(text)
    authz = loaded.proxy.authorization
    assert authz is not None
    assert _policies_summary(loaded).endswith(
        "AuthorizationPolicy 0 ALLOW, 1 DENY, 0 AUDIT (1 ALLOW, 1 DENY in dry run)"
    )
    assert [p.name for p in authz.dry_allow] == ["a"]
    assert [p.name for p in authz.dry_deny] == ["x"]
    assert [p.name for p in authz.deny] == ["d"] and not authz.allow
    (warning,) = [r.getMessage() for r in caplog.records if "annotations" in r.getMessage()]
    assert "AuthorizationPolicy/x" in warning and "team, owner" in warning
    exc = load_error(plain(policy("p", "rules: [{}]", dry_run='"true"'), policy("p", "{}")))
    assert "a second AuthorizationPolicy named 'p'" in str(exc)


def test_two_policies_of_one_name_are_refused() -> None:
    exc = load_error(plain(policy("p", "rules: [{}]"), policy("p", "action: DENY")))
    assert exc.field == "metadata.name" and "a second AuthorizationPolicy named 'p'" in str(exc)
    # In two namespaces they are two policies (and two stats labels).
    config = loads_config(plain(policy("p", "{}", "a"), policy("p", "{}", "b")))
    assert config.proxy.authorization is not None
    assert config.proxy.authorization.names == ("a/p", "b/p")


def test_http_only_fields_follow_istios_tcp_rules_with_one_caution(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ALLOW rule with ``methods`` never matches; a DENY rule ignores ``paths`` (it
    matches more); each field is cautioned once at load."""
    allow = policy(
        "a",
        "rules:\n  - to: [{operation: {methods: [GET]}}]\n"
        "  - to: [{operation: {methods: [POST], ports: ['1']}}]",
    )
    deny = policy("d", "action: DENY\nrules: [{to: [{operation: {paths: [/admin]}}]}]")
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        config = loads_config(plain(allow, deny))
    authz = config.proxy.authorization
    assert authz is not None
    assert [r.never for r in authz.allow[0].rules] == [True, True]
    (rule,) = authz.deny[0].rules
    assert not rule.never and rule.operations == ((),)  # an operation matching anything
    cautions = [r.getMessage() for r in caplog.records if "HTTP-only" in r.getMessage()]
    assert len(cautions) == 2, cautions  # methods (once for both rules' fields), paths


def test_ten_thousand_policies_and_long_lists_load_and_judge_in_bounded_time() -> None:
    """A hostile amount of policy: 10 000 policies and a list of 20 000 CIDR blocks load in
    a few seconds, and a connection is judged in time linear in them (generous bounds)."""
    from metaprotocol_sdk.proxy.authorization import ListenerAuthorization
    from metaprotocol_sdk.proxy.stats import Stats

    many = [
        policy(f"p{i}", f"action: DENY\nrules: [{{from: [{{source: {{namespaces: [n{i}]}}}}]}}]")
        for i in range(10_000)
    ]
    blocks = ", ".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(20_000))
    many.append(policy("big", f"rules: [{{from: [{{source: {{ipBlocks: [{blocks}]}}}}]}}]"))
    started = time.perf_counter()
    config = loads_config(plain(*many))
    assert time.perf_counter() - started < 60
    authz = config.proxy.authorization
    assert authz is not None and len(authz.deny) == 10_000

    class Transport:
        def get_extra_info(self, name: str) -> object:
            return {"peername": ("10.1.2.3", 5), "sockname": ("10.9.9.9", 9000)}.get(name)

    judge = ListenerAuthorization(authz, Stats(), LISTENER)
    started = time.perf_counter()
    verdict = judge.judge(Transport())
    assert time.perf_counter() - started < 5
    assert verdict is None  # 10.1.2.0/24 is one of the blocks: allowed by "big"


def test_ip_blocks_are_merged_ranges_searched_in_log_time() -> None:
    """Blocks of both versions, overlapping and adjacent, single addresses: each lookup is a
    binary search over the merged ranges, exact at every edge."""
    import ipaddress

    from metaprotocol_sdk.proxy.authorization import Addresses

    blocks = ["10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8", "192.168.1.1", "192.168.1.3/32"]
    blocks += ["::1", "fe80::/10", "2001:db8::/64"]
    match = Addresses(ipaddress.ip_network(b, strict=False) for b in blocks)
    assert len(match.ranges[4][0]) == 3  # 10/8 + 11/8 merged; two single addresses
    cases = {
        "9.255.255.255": False,
        "10.0.0.0": True,
        "11.255.255.255": True,
        "12.0.0.0": False,
        "192.168.1.1": True,
        "192.168.1.2": False,
        "192.168.1.3": True,
        "::1": True,
        "::2": False,
        "febf:ffff::1": True,
        "fec0::": False,
        "2001:db8::ffff": True,
        "2001:db8:0:1::": False,
    }
    for ip, want in cases.items():
        assert match.matches(ipaddress.ip_address(ip)) is want, ip
    assert not match.matches(None)
