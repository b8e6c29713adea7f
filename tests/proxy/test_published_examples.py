"""An operator's first day: the YAML Aeraki and Istio publish, given to the engine as written.

Each document below is copied from its project (the source is named above it), with only
what points it at this machine changed: the engine needs a ``ServiceEntry`` with the
service's endpoints (Kubernetes gives Aeraki's a Service), written here by ``served``, and the
KV test codec stands in for Dubbo, Thrift, tRPC: its ``method`` header is the ``method``
attribute, its other headers the other attributes. A document the engine supports is run
with traffic and must do what its project's page says; one it does not support must be
refused with an error naming the field.

Sources, as read: aeraki-mesh/aeraki at 56e4de0f (``demo/`` and ``test/e2e/``), the
tutorials of aeraki.net (aeraki-mesh/website at affb48e5), and the
examples of istio.io's reference pages, which are the comments of istio/api's protos
(``networking/v1alpha3/destination_rule.proto``, ``service_entry.proto``,
``security/v1beta1/peer_authentication.proto``, ``authorization_policy.proto``,
``telemetry/v1alpha1/telemetry.proto``) at b8f8791d.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pytest
from peer_check import missing
from proxy_kit import Client, Upstream, engine_for, error_type, run, until
from rls_kit import Redis, rate_limit_service

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.config.models import DestinationRule

KV = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {name: kv}
spec: {protocol: kv, codec: metaprotocol_sdk.examples.kv:KVCodec}
"""
THRIFT_HOST = "thrift-sample-server.meta-thrift.svc.cluster.local"
DUBBO_HOST = "org.apache.dubbo.samples.basic.api.demoservice"


def served(host: str, port: int, endpoints: list[tuple[int, str]]) -> str:
    """Ours: the ServiceEntry standing for the Kubernetes Service of ``host``, its endpoints
    ``(port, version)`` local KV servers, and the engine's listener for it."""
    eps = "".join(
        f"\n    - {{address: 127.0.0.1, ports: {{tcp-metaprotocol-kv-svc: {p}}}, "
        f"labels: {{version: {v}}}}}"
        for p, v in endpoints
    )
    return (
        f"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc}}\n"
        f"spec:\n  hosts: [{host}]\n"
        f"  ports: [{{number: {port}, name: tcp-metaprotocol-kv-svc, protocol: TCP}}]\n"
        f"  endpoints:{eps}\n---\n"
        "apiVersion: proxy.metaprotocol.io/v1alpha1\nkind: ProxyConfig\nmetadata: {name: e}\n"
        f"spec:\n  listeners: [{{host: {host}, port: {port}, bind: '127.0.0.1:0'}}]\n"
    )


def configuration(host: str, port: int, endpoints: list[tuple[int, str]], *docs: str) -> str:
    return "---\n".join([KV, served(host, port, endpoints), *map(textwrap.dedent, docs)])


async def servers_of(client: Client, n: int, method: str, **headers: str) -> Counter[str]:
    """Which server answered each of ``n`` calls (``error-type`` for a local reply)."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        reply = await client.call(method, headers)
        seen[error_type(reply) or str(reply.attributes.get("server"))] += 1
    return seen


async def connect(engine: Engine, host: str, port: int) -> Client:
    return await Client.connect(engine.listener_addresses[(host, port)])


@dataclass
class Running:
    """A started engine, a client of its listener, and the KV server of each version."""

    engine: Engine
    client: Client
    upstreams: dict[str, Upstream]


@contextlib.asynccontextmanager
async def running(
    host: str, port: int, *docs: str, versions: tuple[str, ...] = ("v1", "v2")
) -> AsyncIterator[Running]:
    """The engine over ``docs`` (see :func:`configuration`) for ``host:port``, whose
    endpoints are one KV server per version, and a client connected to it; the client, the
    engine and the servers are closed on exit."""
    upstreams = {v: await Upstream(v).start() for v in versions}
    try:
        endpoints = [(up.port, v) for v, up in upstreams.items()]
        async with engine_for(configuration(host, port, endpoints, *docs)) as engine:
            client = await connect(engine, host, port)
            try:
                yield Running(engine, client, upstreams)
            finally:
                client.close()
    finally:
        for up in upstreams.values():
            await up.close()


# -- Aeraki: demo/metaprotocol-thrift ---------------------------------------------------------

# demo/metaprotocol-thrift/destinationrule.yaml
THRIFT_DR = """\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: thrift-sample-server
  namespace: meta-thrift
spec:
  host: thrift-sample-server.meta-thrift.svc.cluster.local
  subsets:
    - name: v1
      labels:
        version: v1
    - name: v2
      labels:
        version: v2
"""

# demo/metaprotocol-thrift/metarouter-v1.yaml
THRIFT_V1 = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-thrift-route
  namespace: meta-thrift
spec:
  hosts:
    - thrift-sample-server.meta-thrift.svc.cluster.local
  routes:
    - name: v1
      match:
        attributes:
          method:
            exact: sayHello
      route:
        - destination:
            host: thrift-sample-server.meta-thrift.svc.cluster.local
            subset: v1
"""


def test_aeraki_method_routing_sends_sayhello_to_v1() -> None:
    """Aeraki's "route all requests of a method to a version": every sayHello reaches v1;
    a method no route matches has no route."""

    async def main() -> None:
        async with running(THRIFT_HOST, 9090, THRIFT_DR, THRIFT_V1) as mesh:
            assert await servers_of(mesh.client, 10, "sayHello") == {"v1": 10}
            assert await servers_of(mesh.client, 1, "ping") == {"RouteNotFound": 1}

    run(main())


# demo/metaprotocol-thrift/traffic-split.yaml
THRIFT_SPLIT = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-thrift-route
  namespace: meta-thrift
spec:
  hosts:
    - thrift-sample-server.meta-thrift.svc.cluster.local
  routes:
    - name: traffic-split
      match:
        attributes:
          method:
            exact: sayHello
      route:
        - destination:
            host: thrift-sample-server.meta-thrift.svc.cluster.local
            subset: v1
          weight: 20
        - destination:
            host: thrift-sample-server.meta-thrift.svc.cluster.local
            subset: v2
          weight: 80
"""


def test_aeraki_traffic_split_20_80() -> None:
    """20% of sayHello to v1, 80% to v2 (the engine's split is exact per 100 requests)."""

    async def main() -> None:
        async with running(THRIFT_HOST, 9090, THRIFT_DR, THRIFT_SPLIT) as mesh:
            assert await servers_of(mesh.client, 100, "sayHello") == {"v1": 20, "v2": 80}

    run(main())


# demo/metaprotocol-thrift/metarouter-header-mutation.yaml
THRIFT_MUTATION = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-thrift-route
  namespace: meta-thrift
spec:
  hosts:
    - thrift-sample-server.meta-thrift.svc.cluster.local
  routes:
    - name: header-mutation
      route:
        - destination:
            host: thrift-sample-server.meta-thrift.svc.cluster.local
      requestMutation:
        - key: foo
          value: bar
        - key: foo1
          value: bar1
"""


def test_aeraki_header_mutation_reaches_the_server() -> None:
    async def main() -> None:
        async with running(THRIFT_HOST, 9090, THRIFT_DR, THRIFT_MUTATION) as mesh:
            v1, v2 = mesh.upstreams["v1"], mesh.upstreams["v2"]
            for _ in range(2):  # both endpoints of the service, round robin
                reply = await mesh.client.call("sayHello")
                assert reply.attributes.get("req-foo") == "bar"
                assert reply.attributes.get("req-foo1") == "bar1"
            assert len(v1.received) == len(v2.received) == 1

    run(main())


# demo/metaprotocol-thrift/consistent-hash-lb/destinationrule.yaml
THRIFT_HASH = """\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: thrift-sample-server
  namespace: meta-thrift
spec:
  host: thrift-sample-server.meta-thrift.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: method
"""


def test_aeraki_consistent_hash_on_the_method() -> None:
    """Requests of one method always reach the same server; the methods spread over both."""

    async def main() -> None:
        async with running(THRIFT_HOST, 9090, THRIFT_HASH) as mesh:
            owners: set[str] = set()
            for i in range(16):
                seen = await servers_of(mesh.client, 4, f"method{i}")
                assert len(seen) == 1 and seen.keys() <= {"v1", "v2"}, seen
                owners |= seen.keys()
            assert owners == {"v1", "v2"}

    run(main())


# demo/metaprotocol-thrift/outlier-detection/outlier-detection.yaml (its DestinationRule; the
# file's Deployment of a fake server is Kubernetes' business)
THRIFT_OUTLIER = """\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: thrift-sample-server
  namespace: meta-thrift
spec:
  host: thrift-sample-server.meta-thrift.svc.cluster.local
  trafficPolicy:
    outlierDetection:
      baseEjectionTime: 15m
      consecutive5xxErrors: 5
      interval: 5m
"""


def test_aeraki_outlier_detection_ejects_after_five_errors() -> None:
    """The demo puts a server that fails beside the good ones: after 5 errors in a row it is
    ejected for 15 minutes and the good one takes every request."""

    async def main() -> None:
        async with running(THRIFT_HOST, 9090, THRIFT_OUTLIER) as mesh:
            (cluster,) = mesh.engine.config_dump()["clusters"]
            detection = cluster["outlierDetection"]
            assert detection["consecutive_errors"] == 5
            assert (detection["interval"], detection["base_ejection_time"]) == (300.0, 900.0)
            v2 = mesh.upstreams["v2"]
            await v2.close()  # the failing server: connections refused
            seen = await servers_of(mesh.client, 20, "sayHello")
            assert seen["UpstreamConnectFailure"] == 5 and seen["v1"] == 15, seen
            assert mesh.engine.config_dump()["clusters"][0]["ejected"] == [f"127.0.0.1:{v2.port}"]

    run(main())


# demo/metaprotocol-thrift/metarouter-global-ratelimit.yaml: a MetaRouter with no routes
THRIFT_GLOBAL = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-thrift-route
  namespace: meta-thrift
spec:
  hosts:
  - thrift-sample-server.meta-thrift.svc.cluster.local
  globalRateLimit:
    domain: production
    match:
      attributes:
        method:
          exact: sayHello
    rateLimitService: outbound|8081||rate-limit-server.meta-thrift.svc.cluster.local
    requestTimeout: 100ms
    denyOnFail: true
    descriptors:
    - property: method
      descriptorKey: method
"""


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    if shutil.which("redis-server") is None:
        missing("redis-server", "./dev installs Debian's redis-server")
    server = Redis()
    yield server
    server.stop()


def test_aeraki_global_rate_limit_without_routes(redis: Redis) -> None:
    """Aeraki's global rate limit example is a MetaRouter with no routes: its service's
    traffic goes to the service (Aeraki's default route), sayHello limited by the rate
    limit service. Its rate-limit-server/config.yaml allows 10 sayHello a minute."""

    async def main() -> None:
        with rate_limit_service(redis, {("method", "sayHello"): 10}) as rls:
            ours = (
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
                "metadata: {name: rate-limit-server}\n"
                "spec:\n  hosts: [rate-limit-server.meta-thrift.svc.cluster.local]\n"
                "  ports: [{number: 8081, name: grpc, protocol: GRPC}]\n"
                f"  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {rls.port}}}}}]\n"
            )
            async with running(THRIFT_HOST, 9090, ours, THRIFT_GLOBAL) as mesh:
                seen = await servers_of(mesh.client, 12, "sayHello")
                assert seen == {"v1": 5, "v2": 5, "OverLimit": 2}, seen
                assert (await servers_of(mesh.client, 2, "ping")).keys() <= {"v1", "v2"}
                assert rls.calls == 12  # ping is not checked

    run(main())


# aeraki-mesh/website at affb48e5 (aeraki.net), content/en/docs/v1.x/tutorials/local-rate-limit.md:
# a MetaRouter with only a local rate limit, of conditions only
WEBSITE_LOCAL = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-thrift-route
  namespace: meta-thrift
spec:
  hosts:
  - thrift-sample-server.meta-thrift.svc.cluster.local
  localRateLimit:
    conditions:
    - match:
        attributes:
          method:
            exact: sayHello
      tokenBucket:
        fillInterval: 60s
        maxTokens: 10
        tokensPerFill: 10
    - match:
        attributes:
          method:
            exact: ping
      tokenBucket:
        fillInterval: 60s
        maxTokens: 100
        tokensPerFill: 100
"""


def test_aeraki_website_local_rate_limit_without_routes() -> None:
    """10 sayHello a minute; other methods (no condition, no default bucket) unlimited."""

    async def main() -> None:
        async with running(THRIFT_HOST, 9090, WEBSITE_LOCAL) as mesh:
            seen = await servers_of(mesh.client, 11, "sayHello")
            assert seen == {"v1": 5, "v2": 5, "OverLimit": 1}, seen
            assert (await servers_of(mesh.client, 12, "other")) == {"v1": 6, "v2": 6}

    run(main())


# -- Aeraki: demo/metaprotocol-dubbo and test/e2e/metaprotocol --------------------------------

# demo/metaprotocol-dubbo/destinationrule.yaml (also test/e2e/metaprotocol/testdata)
DUBBO_DR = """\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: dubbo-sample-provider
  namespace: meta-dubbo
spec:
  host: org.apache.dubbo.samples.basic.api.demoservice
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"""

# demo/metaprotocol-dubbo/metarouter-local-ratelimit.yaml
DUBBO_LOCAL = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-dubbo-route
  namespace: meta-dubbo
spec:
  hosts:
    - org.apache.dubbo.samples.basic.api.demoservice
  localRateLimit:
    tokenBucket:
      fillInterval: 60s
      maxTokens: 10
      tokensPerFill: 10
    conditions:
    - tokenBucket:
        fillInterval: 10s
        maxTokens: 2
        tokensPerFill: 2
      match:
        attributes:
          method:
            exact: sayHello
  routes:
    - name: v1
      route:
        - destination:
            host: org.apache.dubbo.samples.basic.api.demoservice
            subset: v1
"""


def test_aeraki_local_rate_limit_default_bucket_and_condition() -> None:
    """sayHello has its own bucket of 2; every other method shares the default 10."""

    async def main() -> None:
        async with running(DUBBO_HOST, 20880, DUBBO_DR, DUBBO_LOCAL) as mesh:
            assert await servers_of(mesh.client, 3, "sayHello") == {"v1": 2, "OverLimit": 1}
            assert await servers_of(mesh.client, 11, "sayGoodbye") == {"v1": 10, "OverLimit": 1}

    run(main())


# demo/metaprotocol-dubbo/traffic-mirroring.yaml
DUBBO_MIRROR = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-dubbo-route
  namespace: meta-dubbo
spec:
  hosts:
    - org.apache.dubbo.samples.basic.api.demoservice
  routes:
    - name: traffic-mirroring
      route:
        - destination:
            host: org.apache.dubbo.samples.basic.api.demoservice
            subset: v1
      mirror:
        host: org.apache.dubbo.samples.basic.api.demoservice
        subset: v2
      mirrorPercentage:
        value: 100.0
"""


def test_aeraki_traffic_mirroring_copies_every_request_to_v2() -> None:
    async def main() -> None:
        async with running(DUBBO_HOST, 20880, DUBBO_DR, DUBBO_MIRROR) as mesh:
            v2 = mesh.upstreams["v2"]
            assert await servers_of(mesh.client, 8, "sayHello") == {"v1": 8}
            await v2.wait_received(8)
            assert [m.operation_name for m in v2.received] == ["sayHello"] * 8

    run(main())


# test/e2e/metaprotocol/testdata/traffic-mirroring.yaml: half of the requests
E2E_MIRROR_HALF = DUBBO_MIRROR.replace("value: 100.0", "value: 50.0").replace(
    "  namespace: meta-dubbo\n", ""
)


def test_aeraki_traffic_mirroring_half() -> None:
    async def main() -> None:
        async with running(DUBBO_HOST, 20880, DUBBO_DR, E2E_MIRROR_HALF) as mesh:
            v2 = mesh.upstreams["v2"]
            assert await servers_of(mesh.client, 200, "sayHello") == {"v1": 200}

            def settled() -> bool:  # each copy v2 took has been answered and counted
                ok = sum(
                    int(v)
                    for k, v in mesh.engine.stats_snapshot().items()
                    if k.startswith("metaprotocol_mirror_total") and 'status="Ok"' in k
                )
                return ok == len(v2.received) > 0

            await until(settled, "the mirrored copies' replies")
            sent = len(v2.received)
            assert 60 <= sent <= 140, sent  # 50% of 200; the draw is random (6 sigma)

    run(main())


# test/e2e/metaprotocol/testdata/metarouter-attribute-prefix.yaml
E2E_PREFIX = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-route
spec:
  hosts:
    - org.apache.dubbo.samples.basic.api.demoservice
  routes:
    - name: v1
      match:
        attributes:
          method:
            prefix: sayHello01
      route:
        - destination:
            host: org.apache.dubbo.samples.basic.api.demoservice
            subset: v1
    - name: v2
      match:
        attributes:
          method:
            prefix: say
      route:
        - destination:
            host: org.apache.dubbo.samples.basic.api.demoservice
            subset: v2
"""

# test/e2e/metaprotocol/testdata/metarouter-attribute-regex.yaml
E2E_REGEX = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-route
spec:
  hosts:
    - org.apache.dubbo.samples.basic.api.demoservice
  routes:
    - name: v1
      match:
        attributes:
          method:
            regex: sayHello01
      route:
        - destination:
            host: org.apache.dubbo.samples.basic.api.demoservice
            subset: v1
    - name: v2
      match:
        attributes:
          method:
            regex: ^s.*o$
      route:
        - destination:
            host: org.apache.dubbo.samples.basic.api.demoservice
            subset: v2
"""


@pytest.mark.parametrize(
    ("router", "expected"),
    [
        (E2E_PREFIX, {"sayHello": "v2", "sayHello01x": "v1", "hello": "RouteNotFound"}),
        (E2E_REGEX, {"sayHello": "v2", "sayHello01": "v1", "sayHello01x": "RouteNotFound"}),
    ],
    ids=["prefix", "regex"],
)
def test_aeraki_attribute_prefix_and_regex_routes(router: str, expected: dict[str, str]) -> None:
    async def main() -> None:
        async with running(DUBBO_HOST, 20880, DUBBO_DR, router) as mesh:
            for method, server in expected.items():
                assert await servers_of(mesh.client, 2, method) == {server: 2}, method

    run(main())


# demo/metaprotocol-dubbo-app-level/traffic-split.yaml (its DestinationRule is DUBBO_DR's, for
# the application-level host)
APP_HOST = "dubbo-sample-provider.meta-dubbo.svc.cluster.local"
APP_SPLIT = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-dubbo-route
  namespace: meta-dubbo
spec:
  hosts:
    - dubbo-sample-provider.meta-dubbo.svc.cluster.local
  routes:
    - name: traffic-split
      match:
        attributes:
          interface:
            exact: org.apache.dubbo.samples.basic.api.DemoService
          method:
            exact: sayHello
          foo:
            exact: bar
      route:
        - destination:
            host: dubbo-sample-provider.meta-dubbo.svc.cluster.local
            subset: v1
          weight: 20
        - destination:
            host: dubbo-sample-provider.meta-dubbo.svc.cluster.local
            subset: v2
          weight: 80
"""


def test_aeraki_app_level_split_on_three_attributes() -> None:
    async def main() -> None:
        rule = DUBBO_DR.replace(DUBBO_HOST, APP_HOST)
        async with running(APP_HOST, 20880, rule, APP_SPLIT) as mesh:
            iface = {"interface": "org.apache.dubbo.samples.basic.api.DemoService"}
            seen = await servers_of(mesh.client, 50, "sayHello", foo="bar", **iface)
            assert seen == {"v1": 10, "v2": 40}
            assert await servers_of(mesh.client, 1, "sayHello", **iface) == {"RouteNotFound": 1}

    run(main())


# demo/metaprotocol-trpc/metarouter-multi-route.yaml
TRPC_HOST = "trpc-sample-server.meta-trpc.svc.cluster.local"
TRPC_ROUTES = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-trpc-route
  namespace: meta-trpc
spec:
  hosts:
    - trpc-sample-server.meta-trpc.svc.cluster.local
  routes:
    - name: v1
      match:
        attributes:
          callee:
            exact: "trpc.test.helloworld"
          version:
            exact: "v1"
          func:
            prefix: "/trpc.test.helloworld.Greeter/SayHello"
      route:
        - destination:
            host: trpc-sample-server.meta-trpc.svc.cluster.local
            subset: v1
    - name: v2
      match:
        attributes:
          callee:
            exact: "trpc.test.helloworld"
          version:
            exact: "v2"
          func:
            prefix: "/trpc.test.helloworld.Greeter/SayHello"
      route:
        - destination:
            host: trpc-sample-server.meta-trpc.svc.cluster.local
            subset: v2
"""


def test_aeraki_trpc_routes_by_callee_version_and_func() -> None:
    async def main() -> None:
        rule = DUBBO_DR.replace(DUBBO_HOST, TRPC_HOST)
        async with running(TRPC_HOST, 8000, rule, TRPC_ROUTES) as mesh:
            call = {
                "callee": "trpc.test.helloworld",
                "func": "/trpc.test.helloworld.Greeter/SayHello",
            }
            for version in ("v1", "v2"):
                seen = await servers_of(mesh.client, 3, "x", version=version, **call)
                assert seen == {version: 3}
            assert await servers_of(mesh.client, 1, "x", version="v3", **call) == {
                "RouteNotFound": 1
            }

    run(main())


# demo/metaprotocol-qza/metarouter-rate-limit.yaml (its DestinationRule has the v1, v2 subsets)
QZA_HOST = "qza-sample-server.meta-qza.svc.cluster.local"
QZA = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-qza-route
  namespace: meta-qza
spec:
  hosts:
    - qza-sample-server.meta-qza.svc.cluster.local
  localRateLimit:
    tokenBucket:
      maxTokens: 5
      tokensPerFill: 5
      fillInterval: 10s
  routes:
    - name: v2
      match:
        attributes:
          cmd:
            exact: "153"
          sub_cmd:
            regex: "1|2"
      route:
        - destination:
            host: qza-sample-server.meta-qza.svc.cluster.local
            subset: v2
"""


def test_aeraki_qza_regex_route_with_a_rate_limit() -> None:
    async def main() -> None:
        rule = DUBBO_DR.replace(DUBBO_HOST, QZA_HOST)
        async with running(QZA_HOST, 9000, rule, QZA) as mesh:
            # The regex matches the whole value: "12" is neither 1 nor 2.
            assert await servers_of(mesh.client, 1, "x", cmd="153", sub_cmd="12") == {
                "RouteNotFound": 1
            }
            seen = await servers_of(mesh.client, 6, "x", cmd="153", sub_cmd="2")
            assert seen == {"v2": 5, "OverLimit": 1}

    run(main())


# test/e2e/metaprotocolgateway/testdata/metarouter.yaml
GATEWAY = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata:
  name: test-metaprotocol-thrift-route
  namespace: meta-thrift
spec:
  gateways:
    - istio-system/istio-ingressgateway
  hosts:
    - thrift-sample-server.meta-thrift.svc.cluster.local
  routes:
    - match:
        attributes:
          method:
            exact: ""
      route:
        - destination:
            host: thrift-sample-server.meta-thrift.svc.cluster.local
            port:
              number: 9090
"""


def test_aeraki_gateway_route_an_empty_exact_value_matches_any_method() -> None:
    """For an ingress gateway (refused here: the engine's routes are its own traffic's).
    Without ``gateways`` its route matches ``exact: ""``, which Aeraki sends as Envoy's
    ``exact_match: ""``: any request carrying the attribute, whatever its value."""
    with pytest.raises(ConfigError) as refused:
        loads_config(configuration(THRIFT_HOST, 9090, [], GATEWAY), "gateway.yaml")
    assert refused.value.field == "spec.gateways[0]"

    async def main() -> None:
        mesh_only = GATEWAY.replace("  gateways:\n    - istio-system/istio-ingressgateway\n", "")
        async with running(THRIFT_HOST, 9090, mesh_only) as mesh:
            assert await servers_of(mesh.client, 4, "sayHello") == {"v1": 2, "v2": 2}
            assert await servers_of(mesh.client, 2, "") == {"v1": 1, "v2": 1}
            dump = mesh.engine.config_dump()["listeners"][0]["routes"][0]["match"]
            assert dump == [{"attribute": "method", "present": True}]

    run(main())


# -- Istio: istio.io reference examples -------------------------------------------------------

RATINGS = "ratings.prod.svc.cluster.local"

# destination_rule.proto: the first examples (a subset's policy over the host's)
BOOKINFO_RATINGS = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: bookinfo-ratings
spec:
  host: ratings.prod.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
  subsets:
  - name: testversion
    labels:
      version: v3
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
"""

# destination_rule.proto: per-port load balancers
BOOKINFO_PORTS = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: bookinfo-ratings-port
spec:
  host: ratings.prod.svc.cluster.local
  trafficPolicy: # Apply to all ports
    portLevelSettings:
    - port:
        number: 80
      loadBalancer:
        simple: LEAST_REQUEST
    - port:
        number: 9080
      loadBalancer:
        simple: ROUND_ROBIN
"""

# destination_rule.proto: ConnectionPoolSettings' TCP example
BOOKINFO_REDIS = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: bookinfo-redis
spec:
  host: ratings.prod.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 30ms
        tcpKeepalive:
          time: 7200s
          interval: 75s
"""

# destination_rule.proto: OutlierDetection's example (host renamed from reviews)
REVIEWS_CB = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews-cb-policy
spec:
  host: ratings.prod.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
      http:
        http2MaxRequests: 1000
        maxRequestsPerConnection: 10
    outlierDetection:
      consecutive5xxErrors: 7
      interval: 5m
      baseEjectionTime: 15m
"""


def test_istio_destination_rule_policies_as_the_reference_describes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def rule(doc: str, port: int = 9080) -> DestinationRule:
        config = loads_config(configuration(RATINGS, port, [(1, "v3")], doc), "dr.yaml")
        return config.destination_rules[RATINGS]

    def groups(doc: str, subset: str | None = None) -> dict[str, Any]:
        """The policy of port 9080 (``subset``'s): its groups as plain values."""
        policy = rule(doc).policy_for(9080, subset)
        return {k: v for k, v in asdict(policy).items() if v is not None}

    assert groups(BOOKINFO_RATINGS)["load_balancer"]["policy"] == "LEAST_REQUEST"
    assert groups(BOOKINFO_RATINGS, "testversion")["load_balancer"]["policy"] == "ROUND_ROBIN"

    with caplog.at_level(logging.WARNING, "metaprotocol.config"):
        assert groups(BOOKINFO_PORTS)["load_balancer"]["policy"] == "ROUND_ROBIN"
    assert (
        "portLevelSettings[0].port.number: host 'ratings.prod.svc.cluster.local' has no port 80"
        in caplog.text
    )

    pool = groups(BOOKINFO_REDIS)["connection_pool"]
    assert (pool["max_connections"], pool["connect_timeout"]) == (100, 0.03)
    assert (pool["keepalive"]["time"], pool["keepalive"]["interval"]) == (7200.0, 75.0)

    cb = groups(REVIEWS_CB)
    pool, detection = cb["connection_pool"], cb["outlier_detection"]
    assert (pool["max_connections"], pool["max_requests"]) == (100, 1000)
    assert pool["max_requests_per_connection"] == 10
    assert (detection["consecutive_errors"], detection["interval"]) == (7, 300.0)
    assert detection["base_ejection_time"] == 900.0


# service_entry.proto: a service of several addresses named in DNS, each with its own port
# (Istio's example is HTTP on port 80; its three names stand for three local servers here)
EXTERNAL_DNS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc-dns
spec:
  hosts:
  - foo.bar.com
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: tcp-metaprotocol-kv
    protocol: TCP
  resolution: DNS
  endpoints:
  - address: localhost
    ports:
      tcp-metaprotocol-kv: {0}
  - address: localhost
    ports:
      tcp-metaprotocol-kv: {1}
  - address: localhost
    ports:
      tcp-metaprotocol-kv: {2}
"""


def test_istio_service_entry_with_dns_endpoints_and_their_ports() -> None:
    async def main() -> None:
        ups = [await Upstream(name).start() for name in ("us", "uk", "in")]
        entry = EXTERNAL_DNS.format(*(u.port for u in ups))
        listener = (
            "apiVersion: proxy.metaprotocol.io/v1alpha1\nkind: ProxyConfig\nmetadata: {name: e}\n"
            "spec:\n  listeners: [{host: foo.bar.com, port: 80, bind: '127.0.0.1:0'}]\n"
        )
        async with engine_for("---\n".join([KV, entry, listener])) as engine:
            client = await connect(engine, "foo.bar.com", 80)
            assert await servers_of(client, 6, "get") == {"us": 2, "uk": 2, "in": 2}
            client.close()
        for up in ups:
            await up.close()

    run(main())


# -- what is refused, and how ------------------------------------------------------------------

REFUSED = [
    (
        "aeraki demo/metaprotocol-dubbo/serviceentry.yaml: pods chosen by labels",
        """\
        apiVersion: networking.istio.io/v1alpha3
        kind: ServiceEntry
        metadata:
          name: dubbo-demoservice
          namespace: meta-dubbo
          annotations:
            interface: org.apache.dubbo.samples.basic.api.DemoService
        spec:
          hosts:
            - org.apache.dubbo.samples.basic.api.demoservice
          ports:
            - number: 20880
              name: tcp-metaprotocol-dubbo
              protocol: TCP
          workloadSelector:
            labels:
              app: dubbo-sample-provider
          resolution: STATIC
        """,
        "spec.workloadSelector",
        "list them in spec.endpoints",
    ),
    (
        "istio destination_rule.proto: cookie hash",
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: bookinfo-ratings
        spec:
          host: ratings.prod.svc.cluster.local
          trafficPolicy:
            loadBalancer:
              consistentHash:
                httpCookie:
                  name: user
                  ttl: 0s
        """,
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie",
        "not supported by this engine",
    ),
    (
        "istio destination_rule.proto: a rule for some client workloads",
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: configure-client-mtls-dr-with-workloadselector
        spec:
          host: ratings.prod.svc.cluster.local
          workloadSelector:
            matchLabels:
              app: ratings
          trafficPolicy:
            loadBalancer:
              simple: ROUND_ROBIN
            portLevelSettings:
            - port:
                number: 31443
              tls:
                credentialName: client-credential
                mode: MUTUAL
        """,
        "spec.workloadSelector",
        "not supported by this engine",
    ),
    (
        "istio destination_rule.proto: zone-aware balancing",
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: ratings-zone-aware
        spec:
          host: ratings.prod.svc.cluster.local
          trafficPolicy:
            loadBalancer:
              simple: ROUND_ROBIN
              zoneAwareLbSetting:
                enabled: true
        """,
        "spec.trafficPolicy.loadBalancer.zoneAwareLbSetting",
        "zone-aware load balancing",
    ),
    (
        "istio destination_rule.proto: a wildcard host",
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: tls-foo
        spec:
          host: "*.foo.com"
          trafficPolicy:
            tls:
              mode: SIMPLE
        """,
        "spec.host",
        "wildcard host '*.foo.com'",
    ),
    (
        "istio destination_rule.proto: Istio mutual TLS, without the workload's identity",
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: ratings-istio-mtls
        spec:
          host: ratings.prod.svc.cluster.local
          trafficPolicy:
            tls:
              mode: ISTIO_MUTUAL
        """,
        "spec.trafficPolicy.tls.mode",
        "set spec.meshIdentity",
    ),
    (
        "istio destination_rule.proto: mutual TLS with files this machine lacks",
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: db-mtls
        spec:
          host: ratings.prod.svc.cluster.local
          trafficPolicy:
            tls:
              mode: MUTUAL
              clientCertificate: /etc/certs/myclientcert.pem
              privateKey: /etc/certs/client_private_key.pem
              caCertificates: /etc/certs/rootcacerts.pem
        """,
        "spec.trafficPolicy.tls.caCertificates",
        "no such file",
    ),
    (
        "istio service_entry.proto: wildcard hosts, the address the client asked for",
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: external-svc-wildcard-example
        spec:
          hosts:
          - "*.bar.com"
          location: MESH_EXTERNAL
          ports:
          - number: 80
            name: tcp-metaprotocol-kv
            protocol: TCP
          resolution: NONE
        """,
        "spec.resolution",
        "'NONE' is not supported",
    ),
    (
        "istio service_entry.proto: a Unix domain socket",
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: unix-domain-socket-example
        spec:
          hosts:
          - "example.unix.local"
          location: MESH_EXTERNAL
          ports:
          - number: 80
            name: tcp-metaprotocol-kv
            protocol: TCP
          resolution: STATIC
          endpoints:
          - address: unix:///var/run/example/socket
        """,
        "spec.endpoints[0].address",
        "a Unix domain socket endpoint",
    ),
    (
        "istio service_entry.proto: VMs and pods chosen by labels",
        """\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: details-svc
        spec:
          hosts:
          - details.bookinfo.com
          location: MESH_INTERNAL
          ports:
          - number: 80
            name: tcp-metaprotocol-kv
            protocol: TCP
          resolution: STATIC
          workloadSelector:
            labels:
              app: details
        """,
        "spec.workloadSelector",
        "list them in spec.endpoints",
    ),
    (
        "istio service_entry.proto: the WorkloadEntry of a VM",
        """\
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: details-vm-1
        spec:
          serviceAccount: details
          address: 2.2.2.2
          labels:
            app: details
            instance-id: vm1
        """,
        "kind",
        "list the workload's address in a ServiceEntry's spec.endpoints",
    ),
    (
        "istio peer_authentication.proto: STRICT, without the workload's identity",
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: default
          namespace: foo
        spec:
          mtls:
            mode: STRICT
        """,
        "spec.mtls.mode",
        "set spec.meshIdentity",
    ),
    (
        "aeraki-mesh/website tutorials/circuit-breaking.md (aeraki.net): a short host name",
        """\
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata:
          name: thrift-sample-server
          namespace: meta-thrift
        spec:
          host: thrift-sample-server
          trafficPolicy:
            outlierDetection:
              baseEjectionTime: 15m
              consecutive5xxErrors: 5
              interval: 5m
        """,
        "spec.host",
        "as 'thrift-sample-server.meta-thrift.svc.cluster.local': write that",
    ),
    (
        "istio telemetry.proto: tracing for the mesh",
        """\
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata:
          name: mesh-default
          namespace: istio-system
        spec:
          # no selector specified, applies to all workloads
          tracing:
          - randomSamplingPercentage: 10.00
        """,
        "kind",
        "spec.tracing",
    ),
]


@pytest.mark.parametrize(
    ("doc", "field", "words"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_refused_with_an_error_naming_the_field(doc: str, field: str, words: str) -> None:
    text = configuration(RATINGS, 9080, [(1, "v3")], doc)
    with pytest.raises(ConfigError) as refused:
        loads_config(text, "published.yaml")
    assert refused.value.field == field, str(refused.value)
    assert words in str(refused.value)


# -- Istio: AuthorizationPolicy on a TCP port ---------------------------------------------------

# authorization_policy.proto: allow-nothing, allow-all, and the first ALLOW example, whose
# rules hold HTTP fields only: on a TCP port Istio drops such an ALLOW rule (it matches nothing)
ALLOW_NOTHING = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
 name: allow-nothing
 namespace: foo
spec:
  {}
"""
ALLOW_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
 name: allow-all
 namespace: foo
spec:
 rules:
 - {}
"""
HTTPBIN_ALLOW = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"""
# authorization_policy.proto: DENY from a namespace (a plain-text client has none)
DENY_DEV = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["POST"]
"""


@pytest.mark.parametrize(
    ("policy", "outcome"),
    [
        (ALLOW_NOTHING, "PermissionDenied"),
        (ALLOW_ALL, "v1"),
        (HTTPBIN_ALLOW, "PermissionDenied"),
        (DENY_DEV, "v1"),
    ],
    ids=["allow-nothing", "allow-all", "allow-http-fields-only", "deny-from-dev"],
)
def test_istio_authorization_policies_on_a_tcp_port(policy: str, outcome: str) -> None:
    async def main() -> None:
        async with running(RATINGS, 9080, policy, versions=("v1",)) as mesh:
            assert await servers_of(mesh.client, 2, "get") == {outcome: 2}

    run(main())
