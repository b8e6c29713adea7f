"""Configuration: the documented example loads; every kind of mistake names doc, field, reason."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from proxy_kit import mesh

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy import load_config, loads_config
from metaprotocol_sdk.proxy.config import parse_duration
from metaprotocol_sdk.proxy.config.loader import build_config

EXAMPLE = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {name: kv, namespace: istio-system}
spec: {protocol: kv, codec: metaprotocol_sdk.examples.kv:KVCodec}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: greeter}
spec:
  hosts: [greeter.example]
  ports: [{number: 9000, name: tcp-metaprotocol-kv-greeter, protocol: TCP}]
  resolution: STATIC
  endpoints:
    - {address: 127.0.0.1, ports: {tcp-metaprotocol-kv-greeter: 19001}, labels: {version: v1}}
    - {address: 127.0.0.1, ports: {tcp-metaprotocol-kv-greeter: 19002}, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: greeter}
spec:
  host: greeter.example
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
    - {name: v1, labels: {version: v1}}
    - name: v2
      labels: {version: v2}
      trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: user}}}
---
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {name: greeter}
spec:
  hosts: [greeter.example]
  routes:
    - name: v2-for-sayHello
      match: {attributes: {method: {exact: sayHello}}}
      route: [{destination: {host: greeter.example, subset: v2}}]
      requestMutation: [{key: x-route, value: v2}]
      responseMutation: [{key: x-proxy, value: metaprotocol}]
      timeout: 2s
    - name: split
      route:
        - {destination: {host: greeter.example, subset: v1}, weight: 20}
        - {destination: {host: greeter.example, subset: v2}, weight: 80}
---
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {name: engine}
spec:
  listeners:
    - {host: greeter.example, port: 9000, bind: "127.0.0.1:0"}
  admin: {bind: "127.0.0.1:0"}
  codecOptions: {kv: {max_frame_size: 1048576}}
  limits: {maxConnections: 10000, maxPendingRequests: 10000}
  timeouts: {connect: 5s, route: 30s, drain: 10s}
"""


def test_documented_example_loads() -> None:
    config = loads_config(EXAMPLE, "example.yaml")
    assert config.protocols["kv"].options == {"max_frame_size": 1048576}
    assert config.services["greeter.example"].ports[9000].protocol == "kv"
    rule = config.destination_rules["greeter.example"]
    sub_lb = rule.subsets["v2"].load_balancer
    assert sub_lb is not None and sub_lb.hash_attribute == "user"
    routes = config.routers["greeter.example"].routes
    assert routes[0].timeout == 2.0 and routes[0].match[0].kind == "exact"
    assert [d.weight for d in routes[1].destinations] == [20, 80]
    assert config.proxy.timeouts.drain == 10.0
    assert config.proxy.listeners[0].name == "greeter.example:9000"


def test_documents_split_over_files(tmp_path: Path) -> None:
    first, rest = EXAMPLE.split("---\n", 1)
    (tmp_path / "a.yaml").write_text(first)
    (tmp_path / "b.yaml").write_text(rest)
    config = load_config([tmp_path / "a.yaml", str(tmp_path / "b.yaml")])
    assert set(config.routers) == {"greeter.example"}


def test_no_proxy_config_and_no_router_is_fine() -> None:
    text = "\n---\n".join(EXAMPLE.split("---\n")[:3])
    config = loads_config(text)
    assert config.proxy.listeners == ()


def test_durations() -> None:
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        parse_duration("10")


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads_config(text, "mesh.yaml")
    return info.value


def _edit(old: str, new: str, count: int = 1) -> str:
    assert old in EXAMPLE, old
    return EXAMPLE.replace(old, new, count)


#: A service whose port name alone selects the installed Thrift codec.
THRIFT_BY_PORT = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: calc}
spec:
  hosts: [calc.example]
  ports: [{number: 9090, name: tcp-metaprotocol-thrift-calc, protocol: TCP}]
  endpoints: [{address: 127.0.0.1, ports: {tcp-metaprotocol-thrift-calc: 19090}}]
---
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {name: engine}
spec:
  listeners: [{host: calc.example, port: 9090, bind: "127.0.0.1:0"}]
  codecOptions: {thrift: {max_frame_sise: 1024}}
"""

MISTAKES = [
    # (edited config, expected source part, expected field, expected reason part)
    pytest.param(
        _edit("kind: DestinationRule", "kind: DestRule"),
        "document 3, DestRule/greeter",
        "kind",
        "unknown kind 'DestRule'",
        id="unknown-kind",
    ),
    pytest.param(
        _edit("  hosts: [greeter.example]\n  ports", "  ports"),
        "ServiceEntry/greeter",
        "spec.hosts",
        "required field is missing",
        id="missing-field",
    ),
    pytest.param(
        _edit("metadata: {name: engine}", "metadata: {}"),
        "document 5",
        "metadata.name",
        "required",
        id="missing-name",
    ),
    pytest.param(
        EXAMPLE.replace("tcp-metaprotocol-kv-greeter", "tcp-metaprotocol-nosuch-greeter"),
        "ServiceEntry/greeter",
        "spec.ports[0].name",
        "no ApplicationProtocol",
        id="bad-port-name",
    ),
    pytest.param(
        "---\n".join(EXAMPLE.split("---\n")[i] for i in (0, 1, 4)).replace(
            "tcp-metaprotocol-kv-greeter", "tcp-greeter"
        ),
        "ProxyConfig/engine",
        "spec.listeners[0].port",
        "tcp-metaprotocol-",
        id="listener-not-meta",
    ),
    pytest.param(
        _edit("codec: metaprotocol_sdk.examples.kv:KVCodec", "codec: nosuchcodec"),
        "ApplicationProtocol/kv",
        "spec.codec",
        "no codec named 'nosuchcodec'",
        id="unknown-codec",
    ),
    pytest.param(
        _edit("codec: metaprotocol_sdk.examples.kv:KVCodec", "codec: os:path"),
        "ApplicationProtocol/kv",
        "spec.codec",
        "not a metaprotocol_sdk.Codec",
        id="not-a-codec",
    ),
    pytest.param(
        _edit("  hosts: [greeter.example]\n  routes", "  hosts: [other.example]\n  routes"),
        "MetaRouter/greeter",
        "spec.hosts[0]",
        "no ServiceEntry defines host 'other.example'",
        id="router-host-without-serviceentry",
    ),
    pytest.param(
        _edit("subset: v2}}]", "subset: v3}}]"),
        "MetaRouter/greeter",
        "spec.routes[0].route[0].destination.subset",
        "unknown subset 'v3'",
        id="unknown-subset",
    ),
    pytest.param(
        _edit("weight: 80", "weight: 30"),
        "MetaRouter/greeter",
        "spec.routes[1].route",
        "must sum to 100, got 50 (20 + 30)",
        id="weights",
    ),
    pytest.param(
        _edit("weight: 80", "weight: -80"),
        "MetaRouter/greeter",
        "spec.routes[1].route[1].weight",
        "integer in [0, 100]",
        id="negative-weight",
    ),
    pytest.param(
        _edit("{exact: sayHello}", '{regex: "say(Hello"}'),
        "MetaRouter/greeter",
        "spec.routes[0].match.attributes.method.regex",
        "invalid regular expression",
        id="bad-regex",
    ),
    pytest.param(
        _edit("{exact: sayHello}", "{exact: a, prefix: b}"),
        "MetaRouter/greeter",
        "spec.routes[0].match.attributes.method",
        "exactly one of",
        id="two-matchers",
    ),
    pytest.param(
        _edit("timeout: 2s", "timeout: soon"),
        "MetaRouter/greeter",
        "spec.routes[0].timeout",
        "invalid duration 'soon'",
        id="bad-duration",
    ),
    pytest.param(
        _edit("connect: 5s", "connect: 5"),
        "ProxyConfig/engine",
        "spec.timeouts.connect",
        "invalid duration",
        id="bare-number-duration",
    ),
    pytest.param(
        _edit("connect: 5s", "connect: 5s, upstreamWrite: 0s"),
        "ProxyConfig/engine",
        "spec.timeouts.upstreamWrite",
        "duration must be positive, got '0s'",
        id="zero-upstream-write",
    ),
    pytest.param(
        _edit("connect: 5s", "connect: 5s, upstreamWrite: 30"),
        "ProxyConfig/engine",
        "spec.timeouts.upstreamWrite",
        "invalid duration 30",
        id="bare-number-upstream-write",
    ),
    pytest.param(
        _edit(
            '    - {host: greeter.example, port: 9000, bind: "127.0.0.1:0"}\n',
            '    - {host: greeter.example, port: 9000, bind: "127.0.0.1:0"}\n'
            '    - {host: greeter.example, port: 9000, bind: "127.0.0.1:0"}\n',
        ),
        "ProxyConfig/engine",
        "spec.listeners[1]",
        "duplicate listener",
        id="duplicate-listener",
    ),
    pytest.param(
        _edit('bind: "127.0.0.1:0"}', 'bind: "localhost"}'),
        "ProxyConfig/engine",
        "spec.listeners[0].bind",
        "host:port",
        id="bad-bind",
    ),
    pytest.param(
        _edit("  host: greeter.example\n  trafficPolicy", "  host: nope.example\n  trafficPolicy"),
        "DestinationRule/greeter",
        "spec.host",
        "no ServiceEntry",
        id="rule-unknown-host",
    ),
    pytest.param(
        _edit("{simple: ROUND_ROBIN}", "{simple: FASTEST}"),
        "DestinationRule/greeter",
        "spec.trafficPolicy.loadBalancer.simple",
        "unknown policy",
        id="bad-lb",
    ),
    pytest.param(
        _edit("max_frame_size: 1048576", "max_frame: 1"),
        "mesh.yaml (document 5, ProxyConfig/engine)",
        "spec.codecOptions.kv.max_frame",
        "unknown option",
        id="bad-codec-option",
    ),
    pytest.param(
        _edit("max_frame_size: 1048576", "max_frame_size: 1MiB"),
        "mesh.yaml (document 5, ProxyConfig/engine)",
        "spec.codecOptions.kv.max_frame_size",
        "must be a positive integer (bytes), got '1MiB'",
        id="codec-option-of-the-wrong-type",
    ),
    pytest.param(
        # No ApplicationProtocol: the port selects the installed codec, whose option is wrong.
        THRIFT_BY_PORT,
        "mesh.yaml (document 2, ProxyConfig/engine)",
        "spec.codecOptions.thrift.max_frame_sise",
        "unknown option for codec thrift",
        id="bad-codec-option-without-application-protocol",
    ),
    pytest.param(
        _edit("  limits:", "  limit:"),
        "ProxyConfig/engine",
        "spec.limit",
        "unknown field",
        id="unknown-proxy-field",
    ),
    pytest.param(
        EXAMPLE + "---\n" + EXAMPLE.split("---\n")[-1],
        "document 6, ProxyConfig/engine",
        "kind",
        "only one ProxyConfig",
        id="two-proxyconfigs",
    ),
    pytest.param(
        _edit("      timeout: 2s", "      localRateLimit: {}"),
        "MetaRouter/greeter",
        "spec.routes[0].localRateLimit",
        "not supported",
        id="unsupported",
    ),
    pytest.param(
        _edit("value: metaprotocol", "value: yes"),
        "MetaRouter/greeter",
        "spec.routes[0].responseMutation[0].value",
        "quote it",
        id="yaml-bool-in-mutation",
    ),
    pytest.param(
        _edit("  hosts: [greeter.example]\n  routes", "  hosts: [{greeter.example: 1}]\n  routes"),
        "MetaRouter/greeter",
        "spec.hosts[0]",
        "must be a non-empty string",
        id="router-host-not-a-string",
    ),
    pytest.param(
        EXAMPLE + "---\n" + EXAMPLE.split("---\n")[3],
        "document 6, MetaRouter/greeter",
        "spec.hosts[0]",
        "already has MetaRouter",
        id="two-routers-one-host",
    ),
    pytest.param(
        _edit("spec: {protocol: kv, ", "spec: {protocol: k-v, "),
        "ApplicationProtocol/kv",
        "spec.protocol",
        "must not contain '-'",
        id="bad-protocol-name",
    ),
    pytest.param(
        "kind: [unclosed\n",
        "mesh.yaml",
        None,
        "invalid YAML (line",
        id="invalid-yaml",
    ),
    pytest.param("- a\n- b\n", "document 1", None, "must be a mapping", id="not-a-mapping"),
    pytest.param(
        _edit('  admin: {bind: "127.0.0.1:0"}', "  accessLog: {path: '-', attributes: [m, M]}"),
        "ProxyConfig/engine",
        "spec.accessLog.attributes[1]",
        "'M' is 'm' again (attributes ignore case)",
        id="access-log-attribute-twice",
    ),
    pytest.param(
        _edit('  admin: {bind: "127.0.0.1:0"}', "  accessLog: {path: '-', attributes: [m, 7]}"),
        "ProxyConfig/engine",
        "spec.accessLog.attributes[1]",
        "must be an attribute's name (1 to 253 characters), got 7",
        id="access-log-attribute-not-a-string",
    ),
    pytest.param(
        _edit(
            '  admin: {bind: "127.0.0.1:0"}',
            f"  accessLog: {{path: '-', attributes: [{', '.join(f'a{i}' for i in range(65))}]}}",
        ),
        "ProxyConfig/engine",
        "spec.accessLog.attributes",
        "65 attributes; at most 64 are logged",
        id="access-log-too-many-attributes",
    ),
    pytest.param(
        _edit('  admin: {bind: "127.0.0.1:0"}', "  accessLog: {path: '-', maxValueLength: 0}"),
        "ProxyConfig/engine",
        "spec.accessLog.maxValueLength",
        "must be an integer in [1, 65536], got 0",
        id="access-log-value-length",
    ),
    pytest.param(
        _edit('  admin: {bind: "127.0.0.1:0"}', "  accessLog: {}"),
        "ProxyConfig/engine",
        "spec.accessLog.path",
        "required field is missing",
        id="access-log-without-path",
    ),
    pytest.param(
        _edit('  admin: {bind: "127.0.0.1:0"}', "  accessLog: {path: '-', filter: {}}"),
        "ProxyConfig/engine",
        "spec.accessLog.filter",
        "names no condition",
        id="access-log-empty-filter",
    ),
    pytest.param(
        _edit(
            '  admin: {bind: "127.0.0.1:0"}', "  accessLog: {path: '-', filter: {failures: 'yes'}}"
        ),
        "ProxyConfig/engine",
        "spec.accessLog.filter.failures",
        "must be true or false, got 'yes'",
        id="access-log-filter-not-bool",
    ),
    pytest.param(
        _edit("{method: {exact: sayHello}}", '{method: {regex: ""}}'),
        "MetaRouter/greeter",
        "spec.routes[0].match.attributes.method.regex",
        "must not be empty",
        id="empty-regex",
    ),
    pytest.param(
        EXAMPLE[: EXAMPLE.index("  routes:\n")]
        + EXAMPLE[EXAMPLE.index("---\napiVersion: proxy") :],
        "MetaRouter/greeter",
        "spec.routes",
        "a MetaRouter needs routes, localRateLimit or globalRateLimit",
        id="router-with-nothing",
    ),
    pytest.param(
        _edit(
            "{address: 127.0.0.1, ports: {tcp-metaprotocol-kv-greeter: 19001}",
            "{address: 'http://10.0.0.1', ports: {tcp-metaprotocol-kv-greeter: 19001}",
        ),
        "ServiceEntry/greeter",
        "spec.endpoints[0].address",
        "must be an IP address or a host name, got 'http://10.0.0.1'",
        id="endpoint-address-url",
    ),
]


@pytest.mark.parametrize(("text", "source", "field", "reason"), MISTAKES)
def test_config_mistakes(text: str, source: str, field: str | None, reason: str) -> None:
    error = _error(text)
    assert error.source is not None and source in error.source
    assert error.field == field
    assert reason in error.reason, error.reason
    assert str(error).startswith(error.source)


def test_a_route_after_one_matching_everything_is_unreachable_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Aeraki's validation warns of it too ("only the last rule can have no match")."""
    first, second = "    - name: v2-for-sayHello\n", "    - name: split\n"
    start, cut = EXAMPLE.index(first), EXAMPLE.index(second)
    end = EXAMPLE.index("---", cut)
    swapped = EXAMPLE[:start] + EXAMPLE[cut:end] + EXAMPLE[start:cut] + EXAMPLE[end:]
    with caplog.at_level(logging.WARNING, "metaprotocol.config"):
        loads_config(swapped, "mesh.yaml")
    assert (
        "spec.routes[0].match: route 'split' matches every request: the routes after it are "
        "never reached" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, "metaprotocol.config"):
        loads_config(EXAMPLE, "mesh.yaml")
    assert "never reached" not in caplog.text


def test_a_route_to_a_host_without_service_entry_loads_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Accepted (in a mesh the ServiceEntry may come later), but in a file most often a typo
    # that `metaprotocol proxy --check` would otherwise call OK.
    typo = _edit(
        "route: [{destination: {host: greeter.example, subset: v2}}]",
        "route: [{destination: {host: greeter.exmaple}}]",
    )
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        loads_config(typo, "mesh.yaml")
    warnings = [r.getMessage() for r in caplog.records if "destination.host" in r.getMessage()]
    assert warnings == [
        "mesh.yaml (document 4, MetaRouter/greeter): spec.routes[0].route[0].destination.host: "
        "no ServiceEntry defines host 'greeter.exmaple': requests routed to it get a "
        "ClusterNotFound reply until one does; ServiceEntry hosts: greeter.example"
    ]
    # From a control plane, a route may name a host whose cluster comes in a later update.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        build_config([("xds", list(yaml.safe_load_all(typo)))], control_plane=True)
    assert [r for r in caplog.records if "destination.host" in r.getMessage()] == []


def test_the_unknown_host_warning_names_a_bounded_number_of_known_hosts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Logged for each route to an unknown host: listing every known host in each made a
    # 110 kB file (2,000 of each) log 34 MB.
    many = ", ".join(f"h{i}.example" for i in range(2000))
    text = _edit(
        "  hosts: [greeter.example]\n  ports", f"  hosts: [greeter.example, {many}]\n  ports"
    )
    text = text.replace(
        "route: [{destination: {host: greeter.example, subset: v2}}]",
        "route: [{destination: {host: greeter.exmaple}}]",
    )
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        loads_config(text, "mesh.yaml")
    [warning] = [r.getMessage() for r in caplog.records if "destination.host" in r.getMessage()]
    assert warning.endswith(
        "ServiceEntry hosts: greeter.example, h0.example, h1.example, h2.example, h3.example, "
        "h4.example, h5.example, h6.example, h7.example, h8.example and 1991 more"
    ), warning


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_config([tmp_path / "nope.yaml"])


def test_mesh_helper_is_valid() -> None:
    loads_config(mesh([(1, "v1")], router="- route: [{destination: {host: svc.test}}]\n"))
