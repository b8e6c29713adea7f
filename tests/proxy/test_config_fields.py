"""No configuration field is silently ignored (issue 15).

Every known field of the five kinds is set, one at a time, on a small valid mesh, and the
outcome checked against this table: honoured (loads, no warning, and where the model shows it,
the value arrived), refused (a ConfigError naming the field and saying why) or warned (loads,
one warning on ``metaprotocol.config`` naming the field). An unknown key in each kind and in
each nested mapping the engine reads is refused, naming its path.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.config import Config
from metaprotocol_sdk.proxy.config.models import (
    AccessLogSettings,
    LoadBalancer,
    LocalityDistribute,
    LocalityLbSetting,
    ProxyProtocol,
    RetryBudget,
    TrafficPolicy,
    Tunnel,
    Warmup,
)

KV = "metaprotocol_sdk.examples.kv:KVCodec"
AUDIT = "metaprotocol_sdk.examples.audit_filter:AuditFilter"
PORT = "tcp-metaprotocol-kv-svc"


def _param_id(value: object) -> str:
    """A test id that is the same in every process (pytest-xdist's workers must agree): a
    probe's repr holds its address, and the certificates' directory is made per process."""
    if callable(value):
        return "probe"
    return str(value).replace(os.path.dirname(PKI["ca"]), "PKI")[:60]


def base() -> dict[str, dict[str, Any]]:
    """A small valid mesh, one document per kind."""
    return {
        "ApplicationProtocol": {
            "kind": "ApplicationProtocol",
            "metadata": {"name": "kv"},
            "spec": {"protocol": "kv", "codec": KV},
        },
        "ServiceEntry": {
            "kind": "ServiceEntry",
            "metadata": {"name": "svc"},
            "spec": {
                "hosts": ["svc.test"],
                "ports": [{"number": 9000, "name": PORT, "protocol": "TCP"}],
                "resolution": "STATIC",
                "endpoints": [
                    {"address": "127.0.0.1", "ports": {PORT: 19001}, "labels": {"version": "v1"}}
                ],
            },
        },
        "DestinationRule": {
            "kind": "DestinationRule",
            "metadata": {"name": "svc"},
            "spec": {
                "host": "svc.test",
                "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
            },
        },
        "MetaRouter": {
            "kind": "MetaRouter",
            "metadata": {"name": "svc"},
            "spec": {
                "hosts": ["svc.test"],
                "routes": [
                    {
                        "name": "r0",
                        "match": {"attributes": {"method": {"exact": "get"}}},
                        "route": [
                            {
                                "destination": {
                                    "host": "svc.test",
                                    "subset": "v1",
                                    "port": {"number": 9000},
                                },
                                "weight": 100,
                            }
                        ],
                    }
                ],
            },
        },
        "ProxyConfig": {
            "kind": "ProxyConfig",
            "metadata": {"name": "engine"},
            "spec": {"listeners": [{"host": "svc.test", "port": 9000, "bind": "127.0.0.1:0"}]},
        },
    }


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def with_fields(kind: str, *assignments: tuple[str, Any]) -> str:
    """The base mesh as YAML, with each ``(path, value)`` (``spec.a[0].b``) of ``kind`` set."""
    docs = base()
    for path, value in assignments:
        node: Any = docs[kind]
        steps = [(name, int(index) if index else None) for name, index in _STEP.findall(path)]
        for n, (name, index) in enumerate(steps):
            key: Any = name if index is None else index
            if n == len(steps) - 1:
                node[key] = copy.deepcopy(value)
            else:
                node = node.setdefault(key, {}) if index is None else node[key]
    return yaml.safe_dump_all(docs.values(), sort_keys=False)


ROUTE = "spec.routes[0]"
DEST = f"{ROUTE}.route[0].destination"
POLICY = "spec.trafficPolicy"
SUB_POLICY = "spec.subsets[0].trafficPolicy"
POOL = f"{POLICY}.connectionPool"
BUCKET = {"maxTokens": 10, "tokensPerFill": 5, "fillInterval": "1s"}
MIRROR = {"host": "svc.test", "subset": "v1", "port": {"number": 9000}}
FAULT = {"delay": {"percentage": {"value": 50}, "fixedDelay": "1s"}}
PORT_POLICY = f"{POLICY}.portLevelSettings[0]"
SUB_PORT_POLICY = f"{SUB_POLICY}.portLevelSettings[0]"
#: A valid ``portLevelSettings`` entry for the base mesh's port (it keeps the rule's
#: ``loadBalancer`` group, so that loading it logs nothing).
PORT_ENTRY = {"port": {"number": 9000}, "loadBalancer": {"simple": "RANDOM"}}


def _pki() -> dict[str, str]:
    """Test certificates (trustme) and an empty CRL, written once for the module."""
    import datetime
    import tempfile
    from pathlib import Path

    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    root = Path(tempfile.mkdtemp(prefix="fields-tls-"))
    ca = trustme.CA()
    leaf = ca.issue_cert("svc.test")
    files = {
        "ca": ca.cert_pem.bytes(),
        "cert": leaf.cert_chain_pems[0].bytes(),
        "key": leaf.private_key_pem.bytes(),
    }
    now = datetime.datetime.now(datetime.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.load_pem_x509_certificate(files["ca"]).subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=1))
        .sign(
            serialization.load_pem_private_key(ca.private_key_pem.bytes(), None),  # type: ignore[arg-type]
            hashes.SHA256(),
        )
    )
    files["crl"] = crl.public_bytes(serialization.Encoding.PEM)
    out = {}
    for name, data in files.items():
        (root / f"{name}.pem").write_bytes(data)
        out[name] = str(root / f"{name}.pem")
    return out


PKI = _pki()
LISTENER_TLS = {"mode": "SIMPLE", "serverCertificate": PKI["cert"], "privateKey": PKI["key"]}


def _route(config: Config) -> Any:
    return config.routers["svc.test"].routes[0]


def _rule(config: Config) -> Any:
    return config.destination_rules["svc.test"]


def _endpoint(config: Config) -> Any:
    return config.services["svc.test"].endpoints[0]


Probe = Callable[[Config], object]

#: (kind, field path, sample value, probe: what the model must then hold).
HONOURED: list[tuple[str, str, Any, Probe | None]] = [
    ("ApplicationProtocol", "apiVersion", "metaprotocol.aeraki.io/v1alpha1", None),
    ("ApplicationProtocol", "spec.codec", KV, lambda c: c.protocols["kv"].codec_name == KV),
    ("ApplicationProtocol", "spec.protocol", "kv", lambda c: "kv" in c.protocols),
    ("ServiceEntry", "apiVersion", "networking.istio.io/v1", None),
    (
        "ServiceEntry",
        "spec.hosts",
        ["svc.test", "alias.test"],
        lambda c: "alias.test" in c.services,
    ),
    ("ServiceEntry", "spec.resolution", "DNS", None),
    (
        "ServiceEntry",
        "spec.subjectAltNames",
        ["spiffe://cluster.local/ns/a/sa/b"],
        lambda c: c.services["svc.test"].subject_alt_names == ("spiffe://cluster.local/ns/a/sa/b",),
    ),
    (
        "ProxyConfig",
        "spec.meshIdentity",
        {
            "directory": "/nonexistent",
            "certificateChain": PKI["cert"],
            "privateKey": PKI["key"],
            "rootCertificates": PKI["ca"],
            "checkInterval": "30s",
        },
        lambda c: (
            c.proxy.mesh_identity is not None
            and c.proxy.mesh_identity.certificate_chain == PKI["cert"]
            and c.proxy.mesh_identity.check_interval == 30
        ),
    ),
    ("ServiceEntry", "spec.ports[0].number", 9000, lambda c: 9000 in c.services["svc.test"].ports),
    ("ServiceEntry", "spec.ports[0].name", PORT, None),
    ("ServiceEntry", "spec.ports[0].protocol", "tcp", None),
    (
        "ServiceEntry",
        "spec.ports[0].targetPort",
        19009,
        lambda c: c.services["svc.test"].ports[9000].target_port == 19009,
    ),
    ("ServiceEntry", "spec.endpoints[0].address", "::1", lambda c: _endpoint(c).address == "::1"),
    ("ServiceEntry", "spec.endpoints[0].ports", {PORT: 19002}, lambda c: _endpoint(c).ports[PORT]),
    ("ServiceEntry", "spec.endpoints[0].labels", {"version": "v1", "zone": "a"}, None),
    ("ServiceEntry", "spec.endpoints[0].weight", 3, lambda c: _endpoint(c).weight == 3),
    (
        "ServiceEntry",
        "spec.endpoints[0].weight",
        2**32 - 1,
        lambda c: _endpoint(c).weight == 2**32 - 1,
    ),
    ("DestinationRule", "apiVersion", "networking.istio.io/v1beta1", None),
    ("DestinationRule", "spec.host", "svc.test", lambda c: "svc.test" in c.destination_rules),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer.simple",
        "RANDOM",
        lambda c: _rule(c).load_balancer.policy == "RANDOM",
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer",
        {"consistentHash": {"httpHeaderName": "user"}},
        lambda c: _rule(c).load_balancer.hash_attribute == "user",
    ),
    (
        "DestinationRule",
        f"{POLICY}.outlierDetection",
        {"splitExternalLocalOriginErrors": True, "consecutiveLocalOriginFailures": 3},
        lambda c: (
            _rule(c).policy.outlier_detection.split_local_origin
            and _rule(c).policy.outlier_detection.consecutive_local_origin_failures == 3
        ),
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer.warmup",
        {"duration": "90s", "minimumPercent": 5, "aggression": 2.5},
        lambda c: _rule(c).load_balancer.warmup == Warmup(90.0, 5.0, 2.5),
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer.warmup",
        {"duration": "1ms", "minimumPercent": 0},
        lambda c: _rule(c).load_balancer.warmup == Warmup(0.001, 0.0, 1.0),
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer.warmupDurationSecs",
        "60s",
        lambda c: _rule(c).load_balancer.warmup == Warmup(60.0),
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer",
        {"consistentHash": {"useSourceIp": True}},
        lambda c: (
            _rule(c).load_balancer.policy == "CONSISTENT_HASH"
            and _rule(c).load_balancer.hash_attribute is None
        ),
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer",
        {"simple": "LEAST_CONN", "warmup": {"duration": "10s"}},
        lambda c: _rule(c).load_balancer.warmup == Warmup(10.0),
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer",
        {"consistentHash": {"httpHeaderName": "u", "ringHash": {"minimumRingSize": 4096}}},
        lambda c: _rule(c).load_balancer.ring_size == 4096,
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer",
        {"consistentHash": {"httpHeaderName": "u", "minimumRingSize": 2048}},
        lambda c: _rule(c).load_balancer.ring_size == 2048,
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer",
        {"consistentHash": {"httpHeaderName": "u", "maglev": {"tableSize": 1021}}},
        lambda c: (
            _rule(c).load_balancer.maglev_table_size == 1021
            and _rule(c).load_balancer.ring_size is None
        ),
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer",
        {"warmup": {"duration": "10s"}},  # the default policy
        lambda c: _rule(c).load_balancer.warmup == Warmup(10.0),
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer.localityLbSetting",
        {"enabled": False, "failover": [{"from": "r1", "to": "r2"}]},
        lambda c: _rule(c).load_balancer.locality == LocalityLbSetting(False, (("r1", "r2"),)),
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer.localityLbSetting.failoverPriority",
        ["topology.kubernetes.io/region", "tier=gold"],
        lambda c: (
            _rule(c).load_balancer.locality
            == LocalityLbSetting(
                failover_priority=(("topology.kubernetes.io/region", None), ("tier", "gold"))
            )
        ),
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer.localityLbSetting.distribute",
        [{"from": "r1/*", "to": {"r1/*": 80, "r2/*": 20}}],
        lambda c: (
            _rule(c).load_balancer.locality
            == LocalityLbSetting(
                distribute=(LocalityDistribute("r1/*", (("r1/*", 80), ("r2/*", 20))),)
            )
        ),
    ),
    (
        "ServiceEntry",
        "spec.endpoints[0].locality",
        "us-east/a",
        lambda c: _endpoint(c).locality == "us-east/a",
    ),
    *(
        (
            "DestinationRule",
            f"{POLICY}.connectionPool.{path}",
            value,
            lambda c, attr=attr: getattr(_rule(c).policy.connection_pool, attr) is not None,
        )
        for path, value, attr in [
            ("tcp.maxConnections", 10, "max_connections"),
            ("tcp.connectTimeout", "2s", "connect_timeout"),
            ("tcp.tcpKeepalive", {"probes": 3, "time": "60s", "interval": "5s"}, "keepalive"),
            ("tcp.maxConnectionDuration", "1h", "max_connection_duration"),
            ("tcp.idleTimeout", "1h", "tcp_idle_timeout"),
            ("http.http1MaxPendingRequests", 10, "max_pending_requests"),
            ("http.http2MaxRequests", 10, "max_requests"),
            ("http.maxRequestsPerConnection", 10, "max_requests_per_connection"),
            ("http.idleTimeout", "30s", "idle_timeout"),
            ("http.maxRetries", 3, "max_retries"),
            ("http.maxConcurrentStreams", 10, "max_concurrent_streams"),
        ]
    ),
    *(
        (
            "DestinationRule",
            f"{POLICY}.outlierDetection.{key}",
            value,
            lambda c, attr=attr, want=want: (
                getattr(_rule(c).policy.outlier_detection, attr) == want
            ),
        )
        for key, value, attr, want in [
            ("consecutiveGatewayErrors", 3, "consecutive_gateway_errors", 3),
            ("consecutive5xxErrors", 4, "consecutive_errors", 4),
            ("interval", "2s", "interval", 2.0),
            ("baseEjectionTime", "7s", "base_ejection_time", 7.0),
            ("maxEjectionPercent", 50, "max_ejection_percent", 50),
            ("minHealthPercent", 20, "min_health_percent", 20),
        ]
    ),
    *(
        (
            "DestinationRule",
            f"{POLICY}.retryBudget",
            value,
            lambda c, want=want: _rule(c).policy.retry_budget == want,
        )
        for value, want in [
            ({}, RetryBudget()),
            ({"percent": 12.5, "minRetryConcurrency": 7}, RetryBudget(12.5, 7)),
        ]
    ),
    *(
        (
            "DestinationRule",
            f"{policy}.proxyProtocol",
            value,
            lambda c, want=want, sub=sub: (
                (_rule(c).subsets["v1"].policy if sub else _rule(c).policy).proxy_protocol == want
            ),
        )
        for policy, sub in [(POLICY, False), (SUB_POLICY, True)]
        for value, want in [
            ({}, ProxyProtocol(1)),  # Istio's default: V1
            ({"version": "V1"}, ProxyProtocol(1)),
            ({"version": "V2"}, ProxyProtocol(2)),
        ]
    ),
    *(
        (
            "DestinationRule",
            f"{policy}.tunnel",
            value,
            lambda c, want=want, sub=sub: (
                (_rule(c).subsets["v1"].policy if sub else _rule(c).policy).tunnel == want
            ),
        )
        for policy, sub in [(POLICY, False), (SUB_POLICY, True)]
        for value, want in [
            ({"targetHost": "kv.example", "targetPort": 9000}, Tunnel("kv.example", 9000)),
            (
                {"protocol": "CONNECT", "targetHost": "10.0.0.1", "targetPort": 65535},
                Tunnel("10.0.0.1", 65535),
            ),
            ({"targetHost": "::1", "targetPort": 1}, Tunnel("::1", 1)),
            ({"targetHost": "kv.example.", "targetPort": 1}, Tunnel("kv.example", 1)),
        ]
    ),
    ("DestinationRule", f"{POLICY}.tls", {"mode": "DISABLE"}, None),
    (
        "DestinationRule",
        f"{POLICY}.tls",
        {
            "mode": "MUTUAL",
            "caCertificates": PKI["ca"],
            "clientCertificate": PKI["cert"],
            "privateKey": PKI["key"],
            "sni": "front.test",
            "subjectAltNames": ["svc.test"],
            "caCrl": PKI["crl"],
        },
        lambda c: (
            _rule(c).policy.tls.mode == "MUTUAL"
            and _rule(c).policy.tls.sni == "front.test"
            and _rule(c).policy.tls.ca_crl == PKI["crl"]
            and _rule(c).policy.tls.context is not None
        ),
    ),
    (
        "DestinationRule",
        f"{POLICY}.tls",
        {"mode": "SIMPLE", "insecureSkipVerify": True},
        lambda c: _rule(c).policy.tls.insecure_skip_verify,
    ),
    (
        "DestinationRule",
        f"{SUB_POLICY}.tls",
        {"mode": "SIMPLE", "caCertificates": PKI["ca"]},
        lambda c: _rule(c).subsets["v1"].policy.tls.mode == "SIMPLE",
    ),
    (
        "DestinationRule",
        f"{POLICY}.portLevelSettings",
        [
            {
                "port": {"number": 9000},
                "loadBalancer": {"consistentHash": {"httpHeaderName": "user"}},
                "connectionPool": {"tcp": {"maxConnections": 3}},
                "outlierDetection": {"consecutive5xxErrors": 2},
                "tls": {"mode": "SIMPLE", "caCertificates": PKI["ca"]},
            }
        ],
        lambda c: (
            (p := _rule(c).policy_for(9000)).load_balancer.hash_attribute == "user"
            and p.connection_pool.max_connections == 3
            and p.outlier_detection.consecutive_errors == 2
            and p.tls.mode == "SIMPLE"
            and _rule(c).policy_for(9000, "v1") == p
            and _rule(c).policy.connection_pool is None
        ),
    ),
    (
        "DestinationRule",
        f"{SUB_POLICY}.portLevelSettings",
        [{"port": {"number": 9000}, "loadBalancer": {"simple": "LEAST_REQUEST"}}],
        lambda c: (
            _rule(c).policy_for(9000, "v1").load_balancer.policy == "LEAST_REQUEST"
            and _rule(c).policy_for(9000).load_balancer.policy == "ROUND_ROBIN"
        ),
    ),
    (
        "ProxyConfig",
        "spec.listeners[0].tls",
        {
            "mode": "MUTUAL",
            "serverCertificate": PKI["cert"],
            "privateKey": PKI["key"],
            "caCertificates": PKI["ca"],
            "minProtocolVersion": "TLSV1_2",
            "maxProtocolVersion": "TLSV1_3",
            "cipherSuites": ["ECDHE-ECDSA-AES128-GCM-SHA256"],
            "subjectAltNames": ["spiffe://cluster.local/ns/a/sa/b"],
            "verifyCertificateSpki": ["47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="],
            "verifyCertificateHash": ["AB:" * 31 + "AB"],
            "caCrl": PKI["crl"],
        },
        lambda c: (
            c.proxy.listeners[0].tls.mode == "MUTUAL"
            and c.proxy.listeners[0].tls.max_protocol_version == "TLSV1_3"
            and c.proxy.listeners[0].tls.subject_alt_names == ("spiffe://cluster.local/ns/a/sa/b",)
            and c.proxy.listeners[0].tls.verify_certificate_spki
            == ("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",)
            and c.proxy.listeners[0].tls.verify_certificate_hash == ("ab" * 32,)
            and c.proxy.listeners[0].tls.ca_crl == PKI["crl"]
        ),
    ),
    (
        "ProxyConfig",
        "spec.listeners[0].connectionRateLimit",
        {"tokenBucket": BUCKET},
        lambda c: (
            c.proxy.listeners[0].connection_rate_limit is not None
            and c.proxy.listeners[0].connection_rate_limit.fill_interval == 1.0
        ),
    ),
    ("DestinationRule", "spec.subsets[0].name", "v1", lambda c: "v1" in _rule(c).subsets),
    ("DestinationRule", "spec.subsets[0].labels", {"version": "v1"}, None),
    (
        "DestinationRule",
        f"{SUB_POLICY}.loadBalancer.simple",
        "LEAST_REQUEST",
        lambda c: _rule(c).subsets["v1"].policy.load_balancer.policy == "LEAST_REQUEST",
    ),
    (
        "DestinationRule",
        f"{SUB_POLICY}.outlierDetection.consecutive5xxErrors",
        2,
        lambda c: _rule(c).subsets["v1"].policy.outlier_detection.consecutive_errors == 2,
    ),
    ("MetaRouter", "apiVersion", "metaprotocol.aeraki.io/v1alpha1", None),
    ("MetaRouter", "spec.hosts", ["svc.test"], None),
    ("MetaRouter", "spec.gateways", ["mesh"], None),
    (
        "MetaRouter",
        "spec.localRateLimit",
        {
            "tokenBucket": BUCKET,
            "conditions": [{"match": {"attributes": {"a": {}}}, "tokenBucket": BUCKET}],
        },
        lambda c: c.routers["svc.test"].local_rate_limit.conditions[0].bucket.max_tokens == 10,
    ),
    (
        "MetaRouter",
        "spec.globalRateLimit",
        {
            "match": {"attributes": {"method": {"exact": "get"}}},
            "domain": "d",
            "requestTimeout": "50ms",
            "denyOnFail": True,
            "rateLimitService": "outbound|9000|v1|svc.test",
            "descriptors": [{"property": "method", "descriptorKey": "m"}],
        },
        lambda c: (
            (g := c.routers["svc.test"].global_rate_limit).endpoints == (("127.0.0.1", 19001),)
            and g.request_timeout == 0.05
            and g.deny_on_fail
            and g.descriptors[0].key == "m"
        ),
    ),
    ("MetaRouter", f"{ROUTE}.name", "named", lambda c: _route(c).name == "named"),
    (
        "MetaRouter",
        f"{ROUTE}.match",
        {"attributes": {"m": {"prefix": "g"}}},
        lambda c: _route(c).match[0].kind == "prefix",
    ),
    ("MetaRouter", f"{ROUTE}.route[0].weight", 100, None),
    (
        "MetaRouter",
        f"{DEST}.host",
        "svc.test",
        lambda c: _route(c).destinations[0].host == "svc.test",
    ),
    ("MetaRouter", f"{DEST}.subset", "v1", lambda c: _route(c).destinations[0].subset == "v1"),
    ("MetaRouter", f"{DEST}.port.number", 9000, lambda c: _route(c).destinations[0].port == 9000),
    (
        "MetaRouter",
        f"{ROUTE}.requestMutation",
        [{"key": "k", "value": "v"}],
        lambda c: _route(c).request_mutation == {"k": "v"},
    ),
    (
        "MetaRouter",
        f"{ROUTE}.responseMutation",
        [{"key": "k", "value": "v"}],
        lambda c: _route(c).response_mutation == {"k": "v"},
    ),
    ("MetaRouter", f"{ROUTE}.mirror", MIRROR, lambda c: _route(c).mirror.percent == 100.0),
    (
        "MetaRouter",
        f"{ROUTE}.mirrorPercentage",
        {"value": 5},
        lambda c: _route(c).mirror.percent == 5.0,
    ),
    ("MetaRouter", f"{ROUTE}.timeout", "2s", lambda c: _route(c).timeout == 2.0),
    ("MetaRouter", f"{ROUTE}.fault", FAULT, lambda c: _route(c).fault.delay == 1.0),
    (
        "MetaRouter",
        f"{ROUTE}.fault",
        {"abort": {"percentage": {"value": 10}, "errorType": "OverLimit"}},
        lambda c: _route(c).fault.abort_percent == 10.0,
    ),
    (
        "MetaRouter",
        f"{ROUTE}.retries",
        {"attempts": 2, "perTryTimeout": "1s", "retryOn": "reset,timeout"},
        lambda c: _route(c).retries.retry_on == {"reset", "timeout"},
    ),
    ("ProxyConfig", "apiVersion", "proxy.metaprotocol.io/v1alpha1", None),
    (
        "ProxyConfig",
        "spec.listeners[0].filters",
        [{"name": AUDIT, "config": {"auditor": "me"}}],
        lambda c: c.proxy.listeners[0].filters[0].config == {"auditor": "me"},
    ),
    (
        "ProxyConfig",
        "spec.admin",
        {"bind": "127.0.0.1:0", "allowRemote": False, "maxConnections": 3, "requestTimeout": "2s"},
        lambda c: c.proxy.admin.max_connections == 3,
    ),
    (
        "ProxyConfig",
        "spec.codecOptions",
        {"kv": {"max_frame_size": 4096}},
        lambda c: c.protocols["kv"].options == {"max_frame_size": 4096},
    ),
    (
        "ProxyConfig",
        "spec.limits",
        {
            "maxConnections": 5,
            "maxUpstreamConnections": 9,
            "maxPendingRequests": 6,
            "maxPendingRequestsPerConnection": 7,
            "connectionBufferBytes": 2048,
            "connectionBufferMaxBytes": 4096,
            "maxStatsSeries": 500,
            "maxRateLimitCalls": 8,
        },
        lambda c: (
            c.proxy.limits.max_pending_requests_per_connection == 7
            and c.proxy.limits.max_stats_series == 500
            and c.proxy.limits.max_rate_limit_calls == 8
            and c.proxy.limits.max_upstream_connections == 9
        ),
    ),
    (
        "ProxyConfig",
        "spec.overload",
        {"maxBufferedBytes": 2 << 20, "maxRssBytes": 64 << 20},
        lambda c: c.proxy.overload.max_rss_bytes == 64 << 20,
    ),
    (
        "ProxyConfig",
        "spec.timeouts",
        {
            "connect": "1s",
            "route": "2s",
            "drain": "3s",
            "idle": "4s",
            "frame": "5s",
            "write": "6s",
            "upstreamWrite": "7s",
            "handshake": "8s",
        },
        lambda c: (
            c.proxy.timeouts.write == 6.0
            and c.proxy.timeouts.upstream_write == 7.0
            and c.proxy.timeouts.handshake == 8.0
        ),
    ),
    (
        "ProxyConfig",
        "spec.watchdog",
        {"missTimeout": "100ms", "megamissTimeout": "2s", "killTimeout": "10s"},
        lambda c: c.proxy.watchdog.megamiss_timeout == 2.0 and c.proxy.watchdog.kill_timeout == 10,
    ),
    (
        "ProxyConfig",
        "spec.accessLog",
        {"path": "-", "attributes": ["method"], "maxValueLength": 64},
        lambda c: c.proxy.access_log == AccessLogSettings("-", ("method",), 64),
    ),
    (
        "ProxyConfig",
        "spec.accessLog.filter",
        {"failures": True, "slowerThan": "2s"},
        lambda c: (
            c.proxy.access_log is not None
            and (c.proxy.access_log.failures_only, c.proxy.access_log.slower_than) == (True, 2.0)
        ),
    ),
    (
        "ProxyConfig",
        "spec.upstream",
        {"connectionsPerEndpoint": 2},
        lambda c: c.proxy.connections_per_endpoint == 2,
    ),
    (
        "ProxyConfig",
        "spec.telemetry",
        {
            "istioMetrics": True,
            "reporter": "destination",
            "workload": {
                "name": "w",
                "namespace": "n",
                "app": "a",
                "version": "v",
                "canonicalService": "cs",
                "canonicalRevision": "cr",
                "cluster": "c",
                "principal": "p",
                "locality": "r1/z1",
            },
        },
        lambda c: (
            c.proxy.telemetry.istio_metrics
            and c.proxy.telemetry.reporter == "destination"
            and c.proxy.telemetry.workload.principal == "p"
            and c.proxy.telemetry.workload.locality == "r1/z1"
        ),
    ),
    (
        "ServiceEntry",
        "metadata.namespace",
        "shop",
        lambda c: c.services["svc.test"].namespace == "shop",
    ),
]

#: (kind, field path, sample value): refused as "not supported by this engine", naming the path.
REFUSED: list[tuple[str, str, Any]] = [
    ("ServiceEntry", "spec.workloadSelector", {"labels": {"app": "svc"}}),
    ("ServiceEntry", "spec.endpoints[0].network", "net-2"),
    ("DestinationRule", "spec.workloadSelector", {"matchLabels": {"app": "svc"}}),
    ("DestinationRule", f"{POLICY}.retryBudget.budgetInterval", "10s"),
    ("DestinationRule", f"{PORT_POLICY}.tls.credentialName", "cred"),
    ("DestinationRule", f"{POLICY}.tls.credentialName", "cred"),
    *(
        ("ProxyConfig", f"spec.listeners[0].tls.{key}", value)
        for key, value in [
            ("credentialName", "cred"),
            ("credentialNames", ["cred"]),
            ("tlsCertificates", [{"serverCertificate": "/c.pem"}]),
            ("httpsRedirect", True),
        ]
    ),
    *(
        ("DestinationRule", f"{POLICY}.loadBalancer.{key}", value)
        for key, value in [
            ("zoneAwareLbSetting", {"enabled": True}),
        ]
    ),
    *(
        ("DestinationRule", f"{POLICY}.loadBalancer.consistentHash.{key}", value)
        for key, value in [
            ("httpCookie", {"name": "c", "ttl": "0s"}),
            ("httpQueryParameterName", "q"),
        ]
    ),
    ("DestinationRule", f"{POLICY}.connectionPool.http.h2UpgradePolicy", "UPGRADE"),
    ("DestinationRule", f"{POLICY}.connectionPool.http.useClientProtocol", True),
    ("DestinationRule", f"{POLICY}.connectionPool.http.http2KeepAlive", {"interval": "5s"}),
    ("DestinationRule", f"{POLICY}.outlierDetection.consecutiveErrors", 5),
    ("DestinationRule", f"{POLICY}.outlierDetection.outlierDetectionHttpErrorCodes", [503]),
    ("MetaRouter", f"{ROUTE}.localRateLimit", {"tokenBucket": BUCKET}),
    ("MetaRouter", f"{ROUTE}.globalRateLimit", {"domain": "d"}),
    ("ProxyConfig", "spec.watchdog.multikillTimeout", "5s"),
    ("ProxyConfig", "spec.watchdog.multikillThreshold", {"value": 50}),
    ("ProxyConfig", "spec.watchdog.maxKillTimeoutJitter", "1s"),
    ("ProxyConfig", "spec.watchdog.actions", [{"event": "KILL"}]),
]

#: Refused values of honoured fields: (kind, field path, value, error field, words of the reason).
CRL = "spec.listeners[0].connectionRateLimit"
WEIGHT = "spec.endpoints[0].weight"
WEIGHT_RANGE = "must be an integer in [1, 4294967295]"

CH = f"{POLICY}.loadBalancer.consistentHash"
WARMUP = f"{POLICY}.loadBalancer.warmup"

REFUSED_VALUES: list[tuple[str, str, Any, str, str]] = [
    *(
        ("DestinationRule", f"{POLICY}.tunnel", value, field, words)
        for value, field, words in [
            ({"targetPort": 80}, f"{POLICY}.tunnel.targetHost", "tunnel target host must be"),
            (
                {"targetHost": "a b", "targetPort": 80},
                f"{POLICY}.tunnel.targetHost",
                "valid FQDN or IP address, got 'a b'",
            ),
            (
                {"targetHost": "h\r\nX: y", "targetPort": 80},
                f"{POLICY}.tunnel.targetHost",
                "valid FQDN or IP address",
            ),
            ({"targetHost": "h"}, f"{POLICY}.tunnel.targetPort", "must be 1-65535, got None"),
            (
                {"targetHost": "h", "targetPort": 0},
                f"{POLICY}.tunnel.targetPort",
                "tunnel target port is invalid: must be 1-65535, got 0",
            ),
            ({"targetHost": "h", "targetPort": 65536}, f"{POLICY}.tunnel.targetPort", "65536"),
            (
                {"targetHost": "h", "targetPort": 1, "protocol": "GET"},
                f"{POLICY}.tunnel.protocol",
                'tunnel protocol must be "CONNECT" or "POST", got \'GET\'',
            ),
            (
                {"targetHost": "h", "targetPort": 1, "protocol": "POST"},
                f"{POLICY}.tunnel.protocol",
                "POST tunnels are not supported",
            ),
            ("h:1", f"{POLICY}.tunnel", "must be a mapping"),
        ]
    ),
    *(
        ("DestinationRule", f"{POLICY}.proxyProtocol", value, field, words)
        for value, field, words in [
            ({"version": "V3"}, f"{POLICY}.proxyProtocol.version", "must be V1 or V2, got 'V3'"),
            ({"version": "v2"}, f"{POLICY}.proxyProtocol.version", "must be V1 or V2, got 'v2'"),
            ({"version": 1}, f"{POLICY}.proxyProtocol.version", "must be V1 or V2, got 1"),
            ("V2", f"{POLICY}.proxyProtocol", "must be a mapping"),
        ]
    ),
    *(
        ("DestinationRule", f"{POLICY}.loadBalancer", {"consistentHash": value}, field, words)
        for value, field, words in [
            ({}, CH, "set a hash key"),
            ({"useSourceIp": False}, CH, "useSourceIp: false hashes nothing"),
            ({"useSourceIp": "yes"}, f"{CH}.useSourceIp", "must be true or false"),
            ({"useSourceIp": True, "httpHeaderName": "u"}, CH, "not both"),
            # An empty name hashed nothing, silently round robin (Envoy NACKs the route).
            ({"httpHeaderName": ""}, f"{CH}.httpHeaderName", "must name a metadata attribute"),
            ({"httpHeaderName": " "}, f"{CH}.httpHeaderName", "must name a metadata attribute"),
            (
                {"httpHeaderName": "u", "ringHash": {}, "maglev": {"tableSize": 7}},
                CH,
                "ringHash or maglev, not both",
            ),
            (
                {"httpHeaderName": "u", "minimumRingSize": 64, "maglev": {"tableSize": 7}},
                f"{CH}.minimumRingSize",
                "Istio refuses it too",
            ),
            ({"httpHeaderName": "u", "maglev": {}}, f"{CH}.maglev.tableSize", "must be set"),
            (
                {"httpHeaderName": "u", "maglev": {"tableSize": 65536}},
                f"{CH}.maglev.tableSize",
                "must be a prime number",
            ),
            (
                {"httpHeaderName": "u", "maglev": {"tableSize": 5000011}},
                f"{CH}.maglev.tableSize",
                "[0, 131071]",
            ),
            (
                {"httpHeaderName": "u", "ringHash": {"minimumRingSize": 8388608}},
                f"{CH}.ringHash.minimumRingSize",
                "[0, 131072]",
            ),
            ({"httpHeaderName": "u", "minimumRingSize": -1}, f"{CH}.minimumRingSize", "[0,"),
        ]
    ),
    ("DestinationRule", WARMUP, {}, f"{WARMUP}.duration", "required field is missing"),
    ("DestinationRule", WARMUP, {"minimumPercent": 5}, f"{WARMUP}.duration", "required"),
    *(
        ("DestinationRule", WARMUP, {"duration": d}, f"{WARMUP}.duration", words)
        for d, words in [
            ("0s", "must be positive"),
            ("500us", "at least 1ms, in whole milliseconds"),
            ("1500us", "at least 1ms, in whole milliseconds"),
            ("soon", "invalid duration"),
            ("9" * 400 + "s", "longer than 10000 years"),
        ]
    ),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer.warmupDurationSecs",
        "100us",
        f"{POLICY}.loadBalancer.warmupDurationSecs",
        "at least 1ms",
    ),
    *(
        ("DestinationRule", WARMUP, {"duration": "1s", key: v}, f"{WARMUP}.{key}", words)
        for key, v, words in [
            ("minimumPercent", 150, "must be in [0, 100]"),
            ("minimumPercent", -1, "must be in [0, 100]"),
            ("minimumPercent", float("nan"), "must be a number"),
            ("minimumPercent", "10%", "must be a number"),
            ("aggression", 0, "must be greater than 0"),
            ("aggression", -0.1, "must be greater than 0"),
            ("aggression", float("inf"), "must be a number"),
            ("aggression", True, "must be a number"),
        ]
    ),
    ("DestinationRule", WARMUP, {"duration": "1s", "speed": 2}, f"{WARMUP}.speed", "unknown"),
    ("DestinationRule", WARMUP, "60s", WARMUP, "must be a mapping"),
    ("ProxyConfig", CRL, {"tokenBucket": {}}, f"{CRL}.tokenBucket", "required field is missing"),
    (
        "ProxyConfig",
        CRL,
        {"tokenBucket": {**BUCKET, "fillInterval": "0s"}},
        f"{CRL}.tokenBucket.fillInterval",
        "must be positive",
    ),
    (
        "DestinationRule",
        f"{POLICY}.tls.mode",
        "ISTIO_MUTUAL",
        f"{POLICY}.tls.mode",
        "set spec.meshIdentity",
    ),
    (
        "DestinationRule",
        f"{SUB_POLICY}.tls.mode",
        "PASSTHROUGH",
        f"{SUB_POLICY}.tls.mode",
        "unknown TLS mode",
    ),
    (
        "DestinationRule",
        f"{POLICY}.tls",
        {"mode": "SIMPLE", "caCertificates": "/nonexistent/ca.pem"},
        f"{POLICY}.tls.caCertificates",
        "no such file",
    ),
    (
        "ProxyConfig",
        "spec.listeners[0].tls",
        {**LISTENER_TLS, "mode": "ISTIO_MUTUAL"},
        "spec.listeners[0].tls.mode",
        "set spec.meshIdentity",
    ),
    (
        "ProxyConfig",
        "spec.listeners[0].tls",
        {**LISTENER_TLS, "minProtocolVersion": "TLSV1_1"},
        "spec.listeners[0].tls.minProtocolVersion",
        "not supported",
    ),
    *(
        ("DestinationRule", f"{POOL}.tcp", {key: value}, f"{POOL}.tcp.{key}", words)
        for key in ("maxConnectionDuration", "idleTimeout")
        for value, words in [
            ("-5s", "invalid duration"),
            ("5", "invalid duration"),
            ("forever", "invalid duration"),
            (30, "invalid duration"),
            ("500us", "at least 1ms"),
            ("87600000000h", "longer than 10000 years"),
            ("9" * 400 + "h", "longer than 10000 years"),
        ]
    ),
    # Any duration: a number of hundreds of digits was infinity (Infinity in /config_dump,
    # not JSON; an OverflowError in a timer).
    *(
        (kind, field, "9" * 400 + "s", field, "longer than 10000 years")
        for kind, field in [
            ("MetaRouter", f"{ROUTE}.timeout"),
            ("DestinationRule", f"{POOL}.http.idleTimeout"),
            ("DestinationRule", f"{POOL}.tcp.connectTimeout"),
            ("ProxyConfig", "spec.timeouts.idle"),
            ("ProxyConfig", "spec.watchdog.killTimeout"),
        ]
    ),
    ("MetaRouter", "spec.gateways", ["istio-system/gw"], "spec.gateways[0]", "not supported"),
    *(
        ("DestinationRule", f"{where}.portLevelSettings", value, f"{where}.{field}", words)
        for where in (POLICY, SUB_POLICY)
        for value, field, words in [
            (PORT_ENTRY, "portLevelSettings", "must be a list"),
            (["x"], "portLevelSettings[0]", "must be a mapping"),
            ([{"tls": {"mode": "DISABLE"}}], "portLevelSettings[0].port", "required field"),
            ([{**PORT_ENTRY, "port": {}}], "portLevelSettings[0].port.number", "required field"),
            *(
                (
                    [{**PORT_ENTRY, "port": {"number": n}}],
                    "portLevelSettings[0].port.number",
                    f"must be an integer in [1, 65535], got {n!r}",
                )
                for n in (0, 65536, -1, "9000")
            ),
            (
                [PORT_ENTRY, {"port": {"number": 9000}, "tls": {"mode": "DISABLE"}}],
                "portLevelSettings[1].port.number",
                f"port 9000 already has settings in {where}.portLevelSettings[0]",
            ),
            (
                [{"port": {"number": 9000}}],
                "portLevelSettings[0]",
                "sets nothing for port 9000: set one of loadBalancer, connectionPool, "
                "outlierDetection, tls",
            ),
            (
                [{**PORT_ENTRY, "loadBalancer": {"simple": "FASTEST"}}],
                "portLevelSettings[0].loadBalancer.simple",
                "unknown policy 'FASTEST'",
            ),
        ]
    ),
    ("ServiceEntry", "spec.resolution", "NONE", "spec.resolution", "not supported"),
    ("ServiceEntry", "spec.resolution", "DNS_ROUND_ROBIN", "spec.resolution", "not supported"),
    ("ServiceEntry", "spec.location", "ELSEWHERE", "spec.location", "MESH_EXTERNAL or"),
    ("ServiceEntry", "spec.ports[0].protocol", "HTTP", "spec.ports[0].protocol", "carries TCP"),
    ("ServiceEntry", "spec.endpoints", [], "spec.endpoints", "resolution DNS without endpoints"),
    ("ServiceEntry", WEIGHT, 0, WEIGHT, "a weight of 0 does not take the endpoint out"),
    ("ServiceEntry", WEIGHT, 2**32, WEIGHT, WEIGHT_RANGE),
    ("ServiceEntry", WEIGHT, -1, WEIGHT, WEIGHT_RANGE),
    ("ServiceEntry", WEIGHT, "3", WEIGHT, WEIGHT_RANGE),
    ("ServiceEntry", WEIGHT, True, WEIGHT, WEIGHT_RANGE),
    ("ServiceEntry", WEIGHT, 1.5, WEIGHT, WEIGHT_RANGE),
    ("ServiceEntry", "apiVersion", "networking.istio.io/v2", "apiVersion", "published as"),
    ("MetaRouter", "apiVersion", "networking.istio.io/v1", "apiVersion", "published as"),
]

#: (kind, field path, sample value): accepted, and one warning names the path.
WARNED: list[tuple[str, str, Any]] = [
    ("DestinationRule", f"{POLICY}.outlierDetection.consecutiveLocalOriginFailures", 3),
    ("DestinationRule", f"{POLICY}.tls.sni", "svc.test"),
    ("DestinationRule", f"{POLICY}.tls.clientCertificate", PKI["cert"]),
    ("ProxyConfig", "spec.listeners[0].tls.caCertificates", PKI["ca"]),
    *(
        (kind, f"metadata.{key}", value)
        for kind in (
            "ApplicationProtocol",
            "DestinationRule",
            "MetaRouter",
            "ProxyConfig",
        )
        for key, value in [
            ("namespace", "istio-system"),
            ("labels", {"app": "svc"}),
            ("annotations", {"note": "x"}),
        ]
    ),
    *(
        ("ServiceEntry", f"metadata.{key}", value)
        for key, value in [
            ("ownerReferences", [{"kind": "X", "name": "y"}]),
            ("finalizers", ["f"]),
        ]
    ),
    # A user's annotations, next to the one kubectl apply writes.
    (
        "ServiceEntry",
        "metadata.annotations",
        {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"},
    ),
    ("ServiceEntry", "spec.exportTo", ["."]),
    ("ServiceEntry", "spec.addresses", ["10.0.0.1"]),
    ("ServiceEntry", "spec.endpoints[0].serviceAccount", "svc"),
    ("DestinationRule", "spec.exportTo", ["*"]),
    ("MetaRouter", "spec.exportTo", ["."]),
    ("DestinationRule", "spec.x-shared", {"version": "v1"}),
]

#: (kind, field path, sample value): written by the Kubernetes API server (kubectl get -o yaml
#: shows them), accepted without a warning.
WRITTEN: list[tuple[str, str, Any]] = [
    *(
        (kind, f"metadata.{key}", value)
        for kind in ("ServiceEntry", "MetaRouter")
        for key, value in [
            ("uid", "1234"),
            ("resourceVersion", "7"),
            ("generation", 2),
            ("creationTimestamp", "2026-01-01T00:00:00Z"),
            ("managedFields", [{"manager": "kubectl"}]),
            ("selfLink", "/apis/x/y"),
            ("deletionTimestamp", "2026-01-01T00:00:00Z"),
            ("deletionGracePeriodSeconds", 0),
            ("annotations", {"kubectl.kubernetes.io/last-applied-configuration": "{}"}),
        ]
    ),
    ("MetaRouter", "status", {"conditions": []}),
    ("ServiceEntry", "status", {}),
]

KINDS = ("ApplicationProtocol", "ServiceEntry", "DestinationRule", "MetaRouter", "ProxyConfig")
LRL = "spec.localRateLimit"
GRL = "spec.globalRateLimit"
GLOBAL = {
    "domain": "d",
    "rateLimitService": "outbound|9000||svc.test",
    "descriptors": [{"property": "method", "descriptorKey": "method"}],
}
CONDITIONS = {"conditions": [{"match": {}, "tokenBucket": BUCKET}]}

#: (kind, path of a mapping, what to set first so that it exists and is valid, or None): the
#: mapping with an unknown key is refused, naming the key's path.
MAPPINGS: list[tuple[str, str, tuple[str, Any] | None]] = [
    *((kind, "", None) for kind in KINDS),
    *((kind, "metadata", None) for kind in KINDS),
    *((kind, "spec", None) for kind in KINDS),
    ("ServiceEntry", "spec.ports[0]", None),
    ("ServiceEntry", "spec.endpoints[0]", None),
    ("DestinationRule", POLICY, None),
    ("DestinationRule", f"{POLICY}.loadBalancer", None),
    (
        "DestinationRule",
        f"{POLICY}.loadBalancer.consistentHash",
        (f"{POLICY}.loadBalancer", {"consistentHash": {"httpHeaderName": "u"}}),
    ),
    *(
        (
            "DestinationRule",
            f"{POLICY}.loadBalancer.consistentHash.{algorithm}",
            (
                f"{POLICY}.loadBalancer",
                {"consistentHash": {"httpHeaderName": "u", algorithm: settings}},
            ),
        )
        for algorithm, settings in [("ringHash", {}), ("maglev", {"tableSize": 7})]
    ),
    (
        "DestinationRule",
        f"{POLICY}.connectionPool.tcp.tcpKeepalive",
        (f"{POLICY}.connectionPool", {"tcp": {"tcpKeepalive": {"probes": 1}}}),
    ),
    ("DestinationRule", f"{POLICY}.connectionPool", (f"{POLICY}.connectionPool", {})),
    ("DestinationRule", f"{POLICY}.connectionPool.tcp", (f"{POLICY}.connectionPool", {"tcp": {}})),
    (
        "DestinationRule",
        f"{POLICY}.connectionPool.http",
        (f"{POLICY}.connectionPool", {"http": {}}),
    ),
    ("DestinationRule", f"{POLICY}.outlierDetection", (f"{POLICY}.outlierDetection", {})),
    ("DestinationRule", f"{POLICY}.tls", (f"{POLICY}.tls", {"mode": "DISABLE"})),
    ("DestinationRule", f"{POLICY}.proxyProtocol", (f"{POLICY}.proxyProtocol", {})),
    (
        "DestinationRule",
        f"{POLICY}.tunnel",
        (f"{POLICY}.tunnel", {"targetHost": "h", "targetPort": 1}),
    ),
    ("DestinationRule", "spec.subsets[0]", None),
    ("DestinationRule", SUB_POLICY, (SUB_POLICY, {})),
    ("DestinationRule", f"{SUB_POLICY}.loadBalancer", (SUB_POLICY, {"loadBalancer": {}})),
    ("DestinationRule", f"{SUB_POLICY}.outlierDetection", (SUB_POLICY, {"outlierDetection": {}})),
    *(
        (
            "DestinationRule",
            f"{entry}{sub}",
            (entry.removesuffix("[0]"), [{**PORT_ENTRY, "connectionPool": {"tcp": {}}}]),
        )
        for entry in (PORT_POLICY, SUB_PORT_POLICY)
        for sub in ("", ".port", ".loadBalancer", ".connectionPool", ".connectionPool.tcp")
    ),
    ("MetaRouter", ROUTE, None),
    ("MetaRouter", f"{ROUTE}.match", None),
    ("MetaRouter", f"{ROUTE}.route[0]", None),
    ("MetaRouter", DEST, None),
    ("MetaRouter", f"{DEST}.port", None),
    (
        "MetaRouter",
        f"{ROUTE}.requestMutation[0]",
        (f"{ROUTE}.requestMutation", [{"key": "k", "value": "v"}]),
    ),
    (
        "MetaRouter",
        f"{ROUTE}.responseMutation[0]",
        (f"{ROUTE}.responseMutation", [{"key": "k", "value": "v"}]),
    ),
    ("MetaRouter", f"{ROUTE}.mirror", (f"{ROUTE}.mirror", MIRROR)),
    ("MetaRouter", f"{ROUTE}.mirror.port", (f"{ROUTE}.mirror", MIRROR)),
    ("MetaRouter", f"{ROUTE}.mirrorPercentage", (f"{ROUTE}.mirror", MIRROR)),
    ("MetaRouter", f"{ROUTE}.fault", (f"{ROUTE}.fault", FAULT)),
    ("MetaRouter", f"{ROUTE}.fault.delay", (f"{ROUTE}.fault", FAULT)),
    ("MetaRouter", f"{ROUTE}.fault.delay.percentage", (f"{ROUTE}.fault", FAULT)),
    (
        "MetaRouter",
        f"{ROUTE}.fault.abort",
        (f"{ROUTE}.fault", {"abort": {"errorType": "OverLimit"}}),
    ),
    ("MetaRouter", f"{ROUTE}.retries", (f"{ROUTE}.retries", {"attempts": 1})),
    ("MetaRouter", LRL, (LRL, {"tokenBucket": BUCKET})),
    ("MetaRouter", f"{LRL}.tokenBucket", (LRL, {"tokenBucket": BUCKET})),
    ("MetaRouter", f"{LRL}.conditions[0]", (LRL, CONDITIONS)),
    ("MetaRouter", f"{LRL}.conditions[0].match", (LRL, CONDITIONS)),
    ("MetaRouter", f"{LRL}.conditions[0].tokenBucket", (LRL, CONDITIONS)),
    ("MetaRouter", GRL, (GRL, GLOBAL)),
    ("MetaRouter", f"{GRL}.match", (GRL, {**GLOBAL, "match": {}})),
    ("MetaRouter", f"{GRL}.descriptors[0]", (GRL, GLOBAL)),
    ("ProxyConfig", "spec.listeners[0]", None),
    ("ProxyConfig", "spec.listeners[0].tls", ("spec.listeners[0].tls", LISTENER_TLS)),
    *(
        (
            "ProxyConfig",
            f"spec.listeners[0].connectionRateLimit{sub}",
            (CRL, {"tokenBucket": BUCKET}),
        )
        for sub in ("", ".tokenBucket")
    ),
    (
        "ProxyConfig",
        "spec.listeners[0].filters[0]",
        ("spec.listeners[0].filters", [{"name": AUDIT}]),
    ),
    ("ProxyConfig", "spec.admin", ("spec.admin", {"bind": "127.0.0.1:0"})),
    ("ProxyConfig", "spec.limits", ("spec.limits", {})),
    ("ProxyConfig", "spec.overload", ("spec.overload", {})),
    ("ProxyConfig", "spec.timeouts", ("spec.timeouts", {})),
    ("ProxyConfig", "spec.watchdog", ("spec.watchdog", {})),
    ("ProxyConfig", "spec.accessLog", ("spec.accessLog", {"path": "-"})),
    ("ProxyConfig", "spec.upstream", ("spec.upstream", {})),
    ("ProxyConfig", "spec.telemetry", ("spec.telemetry", {})),
    ("ProxyConfig", "spec.telemetry.workload", ("spec.telemetry.workload", {})),
]

HASHING = f"{POLICY}.loadBalancer.consistentHash"
#: Fields that need another one set first (a path prefix, what to set).
NEEDS = {
    f"{ROUTE}.mirrorPercentage": (f"{ROUTE}.mirror", MIRROR),
    # A DISABLE block: its other fields are warned about (they set nothing); SIMPLE for a
    # client certificate (sent with MUTUAL only).
    f"{POLICY}.tls.sni": (f"{POLICY}.tls", {"mode": "DISABLE"}),
    f"{POLICY}.tls.clientCertificate": (f"{POLICY}.tls", {"mode": "SIMPLE"}),
    f"{POLICY}.tls.credentialName": (f"{POLICY}.tls", {"mode": "SIMPLE"}),
    "spec.listeners[0].tls.": ("spec.listeners[0].tls", LISTENER_TLS),
    f"{HASHING}.": (f"{POLICY}.loadBalancer", {"consistentHash": {"httpHeaderName": "u"}}),
    f"{PORT_POLICY}.": (f"{POLICY}.portLevelSettings", [{**PORT_ENTRY, "tls": {"mode": "SIMPLE"}}]),
    "spec.accessLog.": ("spec.accessLog", {"path": "-"}),
}


def load(kind: str, path: str, value: Any) -> Config:
    setup = [needs for prefix, needs in NEEDS.items() if path.startswith(prefix)]
    return loads_config(with_fields(kind, *setup, (path, value)), "fields.yaml")


def config_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "metaprotocol.config"]


def test_the_base_mesh_loads_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        loads_config(with_fields("ProxyConfig"), "fields.yaml")
    assert config_warnings(caplog) == []


@pytest.mark.parametrize(("kind", "path", "value", "probe"), HONOURED, ids=_param_id)
def test_honoured_field(
    kind: str, path: str, value: Any, probe: Probe | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        config = load(kind, path, value)
    assert config_warnings(caplog) == []
    if probe is not None:
        assert probe(config), f"{kind} {path}: the value did not reach the model"


@pytest.mark.parametrize(("kind", "path", "value"), REFUSED, ids=_param_id)
def test_refused_field(kind: str, path: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        load(kind, path, value)
    assert caught.value.field == path
    assert caught.value.reason.startswith("not supported by this engine: "), caught.value.reason
    assert f", {kind}/" in (caught.value.source or "")


@pytest.mark.parametrize(("kind", "path", "value", "field", "words"), REFUSED_VALUES, ids=_param_id)
def test_refused_value(kind: str, path: str, value: Any, field: str, words: str) -> None:
    setup = [("spec.resolution", "DNS")] if path == "spec.endpoints" else []
    with pytest.raises(ConfigError) as caught:
        loads_config(with_fields(kind, *setup, (path, value)), "fields.yaml")
    assert caught.value.field == field
    assert words in caught.value.reason


def test_tcp_lifetime_and_idle_timeout_values() -> None:
    """``tcp.maxConnectionDuration`` and ``tcp.idleTimeout``: ``0s`` is off (as in Istio),
    1 ms is the least, years fit (no overflow); ``http.idleTimeout`` wins when set (as
    istiod's cluster translation does), shorter or longer."""
    tcp = {"maxConnectionDuration": "0s", "idleTimeout": "0s"}
    pool = _rule(load("DestinationRule", f"{POOL}.tcp", tcp)).policy.connection_pool
    assert pool.max_connection_duration is None and pool.tcp_idle_timeout is None
    assert pool.upstream_idle_timeout is None
    tcp = {"maxConnectionDuration": "87600h", "idleTimeout": "1ms"}
    pool = _rule(load("DestinationRule", f"{POOL}.tcp", tcp)).policy.connection_pool
    assert pool.max_connection_duration == 87600 * 3600.0
    assert pool.tcp_idle_timeout == pool.upstream_idle_timeout == 0.001
    both = {"tcp": {"idleTimeout": "1h"}, "http": {"idleTimeout": "5m"}}
    pool = _rule(load("DestinationRule", POOL, both)).policy.connection_pool
    assert pool.upstream_idle_timeout == 300.0
    both = {"tcp": {"idleTimeout": "2s"}, "http": {"idleTimeout": "5m"}}
    pool = _rule(load("DestinationRule", POOL, both)).policy.connection_pool
    assert pool.upstream_idle_timeout == 300.0
    both = {"tcp": {"idleTimeout": "0s"}, "http": {"idleTimeout": "5m"}}
    pool = _rule(load("DestinationRule", POOL, both)).policy.connection_pool
    assert pool.upstream_idle_timeout == 300.0


@pytest.mark.parametrize(("kind", "path", "value"), WARNED, ids=_param_id)
def test_warned_field(kind: str, path: str, value: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        load(kind, path, value)
    (warning,) = config_warnings(caplog)
    assert f", {kind}/" in warning
    assert f": {path}: accepted and ignored: " in warning


@pytest.mark.parametrize(("kind", "path", "value"), WRITTEN, ids=_param_id)
def test_a_field_the_api_server_writes_is_accepted_silently(
    kind: str, path: str, value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``kubectl get -o yaml`` output: what the API server (or kubectl apply) wrote is no
    user's doing; a warning for each, at every start, was noise. A debug line names it."""
    with caplog.at_level(logging.DEBUG, logger="metaprotocol.config"):
        load(kind, path, value)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], config_warnings(caplog)
    if not path.endswith("annotations"):
        assert any(
            f": {path}: written by the Kubernetes API server" in w for w in config_warnings(caplog)
        )


#: One PeerAuthentication and one AuthorizationPolicy (in dry run) as ``kubectl get
#: peerauthentication,authorizationpolicy -A -o yaml`` writes them, after kubectl apply.
KUBECTL = """\
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"security.istio.io/v1","kind":"PeerAuthentication"}
    creationTimestamp: "2026-01-01T00:00:00Z"
    generation: 1
    name: default
    namespace: istio-system
    resourceVersion: "1234"
    uid: 0b6f1d9e-1c1f-4d2a-9a57-3c1c2f1d0a11
  spec: {mtls: {mode: DISABLE}}
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    annotations:
      istio.io/dry-run: "true"
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy"}
    creationTimestamp: "2026-01-01T00:00:00Z"
    generation: 2
    managedFields:
    - apiVersion: security.istio.io/v1
      fieldsType: FieldsV1
      fieldsV1: {"f:spec": {}}
      manager: kubectl-client-side-apply
      operation: Update
      time: "2026-01-01T00:00:00Z"
    name: deny-all
    namespace: istio-system
    resourceVersion: "1235"
    uid: 7c0e5d1a-2b3c-4d5e-8f90-a1b2c3d4e5f6
  spec:
    action: DENY
    rules: [{}]
  status: {}
"""


def test_kubectl_shaped_policies_load_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The mesh's policies as kubectl lists them load without a warning (there were 5 or 6
    per policy at every start); a user's label or annotation on them is still named."""
    workload = {"namespace": "shop", "labels": {"app": "svc"}}
    text = with_fields("ProxyConfig", ("spec.telemetry.workload", workload)) + "---\n" + KUBECTL
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        config = loads_config(text, "fields.yaml")
    assert config_warnings(caplog) == []
    authz = config.proxy.authorization
    assert authz is not None and [p.name for p in authz.dry_deny] == ["istio-system/deny-all"]
    labelled = text.replace("    generation: 2\n", "    generation: 2\n    labels: {team: a}\n")
    labelled = labelled.replace(
        'istio.io/dry-run: "true"', 'istio.io/dry-run: "true"\n      note: x'
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        loads_config(labelled, "fields.yaml")
    warnings = config_warnings(caplog)
    assert len(warnings) == 2, warnings
    assert any("metadata.labels: accepted and ignored" in w for w in warnings)
    assert any(
        "metadata.annotations: accepted and ignored" in w and "(note)" in w for w in warnings
    )


@pytest.mark.parametrize(("kind", "path", "setup"), MAPPINGS, ids=_param_id)
def test_unknown_field_is_refused(kind: str, path: str, setup: tuple[str, Any] | None) -> None:
    field = f"{path}.bogusField" if path else "bogusField"
    with pytest.raises(ConfigError) as caught:
        loads_config(with_fields(kind, *([setup] if setup else []), (field, 1)), "fields.yaml")
    assert caught.value.field == field
    assert caught.value.reason.startswith("unknown field; expected one of "), caught.value.reason


def test_a_warning_is_logged_once_per_field_and_document(
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint = {"address": "127.0.0.1", "serviceAccount": "sa", "labels": {"version": "v1"}}
    docs = yaml.safe_load_all(
        with_fields("ServiceEntry", ("spec.endpoints", [endpoint, endpoint, endpoint]))
    )
    mesh = {doc["kind"]: doc for doc in docs}
    mesh["DestinationRule"]["metadata"]["namespace"] = "a"
    text = (
        yaml.safe_dump_all(mesh.values(), sort_keys=False)
        + "---\n"
        + yaml.safe_dump(
            {
                **base()["ApplicationProtocol"],
                "metadata": {"name": "kv2", "namespace": "a"},
                "spec": {"protocol": "kv2", "codec": KV},
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        loads_config(text, "fields.yaml")
    warnings = config_warnings(caplog)
    assert len(warnings) == 3, warnings
    assert sum("spec.endpoints[0].serviceAccount" in w for w in warnings) == 1
    assert sum("metadata.namespace" in w for w in warnings) == 2  # one in each document


def test_port_settings_for_a_port_no_service_entry_declares_load_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Istio ignores them silently; here they are logged (a typo in a port number, most often).
    settings = [{**PORT_ENTRY, "port": {"number": 9999}}]
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        config = load("DestinationRule", f"{POLICY}.portLevelSettings", settings)
    (warning,) = config_warnings(caplog)
    assert ", DestinationRule/svc" in warning
    assert (
        f"{PORT_POLICY}.port.number: host 'svc.test' has no port 9999 in its ServiceEntry "
        "(ports: 9000): these settings apply to no traffic"
    ) in warning
    assert _rule(config).policy_for(9000).load_balancer.policy == "ROUND_ROBIN"


def test_a_port_leaving_out_a_group_set_to_nothing_is_not_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A group set but changing nothing (no limits, detection off, plain TCP) is the default
    # already: a port's entry that leaves it out changes nothing either.
    text = with_fields(
        "DestinationRule",
        (f"{POLICY}.connectionPool", {}),
        (f"{POLICY}.outlierDetection", {"consecutive5xxErrors": 0}),
        (f"{POLICY}.tls", {}),
        (f"{POLICY}.portLevelSettings", [PORT_ENTRY]),
    )
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        rule = _rule(loads_config(text, "fields.yaml"))
    assert config_warnings(caplog) == []
    assert rule.policy.connection_pool is not None and rule.policy.connection_pool.inert
    assert rule.policy.outlier_detection is not None and rule.policy.outlier_detection.inert
    assert rule.policy.applied() == TrafficPolicy(LoadBalancer())


def test_a_group_port_settings_leave_out_has_its_default_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outlier = {"consecutive5xxErrors": 3}
    pool = {"http": {"http2MaxRequests": 7}}
    text = with_fields(
        "DestinationRule",
        (f"{POLICY}.tls", {"mode": "DISABLE"}),  # the default: not worth a warning
        (f"{POLICY}.outlierDetection", outlier),
        (f"{POLICY}.connectionPool", {"tcp": {"maxConnections": 1}}),
        (f"{POLICY}.portLevelSettings", [{"port": {"number": 9000}, "connectionPool": pool}]),
    )
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        rule = _rule(loads_config(text, "fields.yaml"))
    (warning,) = config_warnings(caplog)
    assert (
        f"{PORT_POLICY}: sets no loadBalancer, outlierDetection: traffic to port 9000 has the "
        "defaults, not the trafficPolicy's"
    ) in warning
    # Istio's semantics: the port's settings replace the whole policy, groups and fields.
    for subset in (None, "v1"):  # v1 has no policy of its own: the rule's port settings
        port = rule.policy_for(9000, subset)
        assert port.load_balancer is None and port.outlier_detection is None
        assert port.connection_pool.max_requests == 7
        assert port.connection_pool.max_connections is None  # not merged with the rule's
    assert rule.policy_for(9001).outlier_detection.consecutive_errors == 3  # other ports


@pytest.mark.parametrize(
    "lb",
    [
        {"simple": "RANDOM", "warmup": {"duration": "60s"}},
        {"consistentHash": {"httpHeaderName": "u"}, "warmupDurationSecs": "60s"},
    ],
    ids=["random", "consistent-hash"],
)
def test_warmup_with_a_policy_istiod_sends_no_slow_start_for_is_dropped_with_a_caution(
    lb: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """istiod writes Envoy's slow_start_config for ROUND_ROBIN and LEAST_REQUEST only: with
    RANDOM or a hash ring the warmup is validated, then has no effect (said once)."""
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        config = load("DestinationRule", f"{POLICY}.loadBalancer", lb)
    assert _rule(config).load_balancer.warmup is None
    (warning,) = config_warnings(caplog)
    assert "warmup has no effect with" in warning and "ROUND_ROBIN and LEAST_REQUEST" in warning
    bad = {**lb, "warmup": {"duration": "60s", "aggression": 0}}
    with pytest.raises(ConfigError, match="must be greater than 0"):
        load("DestinationRule", f"{POLICY}.loadBalancer", bad)


def test_warmup_wins_over_warmup_duration_secs(caplog: pytest.LogCaptureFixture) -> None:
    lb = {"warmupDurationSecs": "60s", "warmup": {"duration": "5s"}}
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        config = load("DestinationRule", f"{POLICY}.loadBalancer", lb)
    assert _rule(config).load_balancer.warmup == Warmup(5.0)
    (warning,) = config_warnings(caplog)
    assert "warmupDurationSecs" in warning and "ignored" in warning
