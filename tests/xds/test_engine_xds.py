"""The engine under a control plane: real thriftpy2 clients and servers, the test ADS server.

One client connection stays open through every update while a second thread keeps calling:
a route change, a weight change and an endpoint removal take effect over xDS with no failed
request and no dropped connection; a snapshot the engine refuses is NACKed with an
``error_detail`` and changes nothing; after the control plane restarts the client
reconnects and the next update applies.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from control_plane import BlackHole, ControlPlane
from snapshots import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    HOST,
    MESH_CLUSTERS,
    OTHER_PORT,
    PORT,
    RDS_NAME,
    ROUTE_TYPE,
    MetaRoute,
    cluster,
    distribute_snapshot,
    failover_snapshot,
    hello_snapshots,
    load_assignment,
    port_policy_snapshot,
    refused_route,
    route_configuration,
    tls_cluster,
    tls_socket,
)

from metaprotocol_sdk.demo.idl import hello, untyped
from metaprotocol_sdk.demo.thrift_server import HelloServer
from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy import Engine, loads_config
from metaprotocol_sdk.proxy.config.models import LoadBalancer, Xds, XdsNode
from metaprotocol_sdk.proxy.xds.client import XdsClient, backoff_delay

T = TypeVar("T")
NODE = "sidecar~127.0.0.1~engine.default~default.svc.cluster.local"
TYPES = (CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE)


def config_yaml(xds_port: int | str, extra: str = "") -> str:
    """The engine's configuration under the test control plane on ``xds_port`` (a port of
    127.0.0.1, or an address as it is)."""
    address = xds_port if isinstance(xds_port, str) else f"127.0.0.1:{xds_port}"
    return f"""
kind: ServiceEntry
metadata: {{name: hello}}
spec:
  hosts: [{HOST}]
  ports: [{{number: {PORT}, name: tcp-metaprotocol-thrift-hello}}]
---
kind: ProxyConfig
metadata: {{name: proxy}}
spec:
  listeners: [{{host: {HOST}, port: {PORT}, bind: "127.0.0.1:0"}}]
  xds:
    address: "{address}"
    node: {{id: "{NODE}"}}
    backoff: {{initial: 20ms, max: 200ms}}{extra}
"""


class Harness:
    """The engine and its xDS client on an event loop in a background thread."""

    def __init__(self, yaml_text: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = loads_config(yaml_text)
        self.engine = Engine(config)
        self.call(self.engine.start())
        self.client = XdsClient(self.engine, config)

        async def start() -> None:
            self.client.start()

        self.call(start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait(self, predicate: Callable[[XdsClient], bool], timeout: float = 20) -> None:
        self.call(self.client.wait_for(predicate, timeout), timeout + 5)

    def dump(self) -> dict[str, Any]:
        async def dump() -> dict[str, Any]:
            return self.engine.config_dump()

        return self.call(dump())

    @property
    def port(self) -> int:
        return self.engine.listener_addresses[HOST, PORT][1]

    def close(self) -> None:
        self.call(self.client.stop())
        self.call(self.engine.stop(drain=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Caller:
    """A thriftpy2 client on one connection, calling sayHello in a loop from its own thread."""

    def __init__(self, port: int) -> None:
        tt = untyped("thriftpy2.transport")
        rpc = untyped("thriftpy2.rpc")
        self.client = rpc.make_client(
            hello().Hello,
            "127.0.0.1",
            port,
            trans_factory=tt.TFramedTransportFactory(),
            timeout=10_000,
        )
        self.replies: list[str] = []
        #: When each reply came (``time.monotonic()``).
        self.stamps: list[float] = []
        self.errors: list[BaseException] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self.client.sayHello("xds")
            except Exception as exc:  # a failed request is what the test looks for
                with self._cond:
                    self.errors.append(exc)
                    self._cond.notify_all()
                return
            with self._cond:
                self.replies.append(reply.split(":")[0])
                self.stamps.append(time.monotonic())
                self._cond.notify_all()

    def next(self, count: int) -> Counter[str]:
        """The servers that answered the next ``count`` calls (after the one in flight now,
        which may have been routed before the last update and keeps its route)."""
        with self._cond:
            start = len(self.replies) + 1
            assert self._cond.wait_for(
                lambda: len(self.replies) >= start + count or self.errors, 20
            ), "calls stalled"
            assert not self.errors, self.errors
            return Counter(self.replies[start : start + count])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(20)
        self.client.close()


def admin_dump(harness: Harness) -> dict[str, Any]:
    """``/config_dump`` over HTTP from the engine's admin endpoint."""
    assert harness.engine.admin_address is not None
    host, port = harness.engine.admin_address
    with urllib.request.urlopen(f"http://{host}:{port}/config_dump", timeout=10) as reply:
        return json.load(reply)  # type: ignore[no-any-return]


async def _stats(engine: Engine) -> dict[str, float]:
    return engine.stats_snapshot()


def acked(version: str) -> Callable[[XdsClient], bool]:
    return lambda c: all(state.version == version for state in c.types.values())


def snapshots(servers: dict[str, HelloServer]) -> list[tuple[str, dict[str, list[Any]]]]:
    v1 = [("127.0.0.1", servers["v1a"].port), ("127.0.0.1", servers["v1b"].port)]
    return hello_snapshots(v1, [("127.0.0.1", servers["v2"].port)])


def test_the_control_plane_through_a_unix_socket_as_istio_agents_xds_proxy(
    servers: dict[str, HelloServer],
) -> None:
    """istio-agent serves an xDS proxy on /etc/istio/proxy/XDS (the grpc-agent template
    mounts it into every container) and forwards each stream to istiod over mutual TLS: the
    engine's ``spec.xds.address: unix:<path>`` takes its configuration there."""
    directory = tempfile.mkdtemp(prefix="xds-", dir="/tmp")
    control_plane = ControlPlane(unix=f"{directory}/XDS").start()
    try:
        control_plane.set_snapshot(*snapshots(servers)[1])
        harness = Harness(config_yaml(f"unix:{directory}/XDS"))
        try:
            harness.wait(acked("2"))
            assert Caller(harness.port).next(10) == {"v2": 10}
            assert harness.dump()["xds"]["streams"]["ads"]["address"] == f"unix:{directory}/XDS"
        finally:
            harness.close()
    finally:
        control_plane.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_an_internal_error_of_the_translation_is_nacked_and_the_stream_kept(
    control_plane: ControlPlane, servers: dict[str, HelloServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of the engine's own while translating an update (injected here: no response
    is known to cause one) is NACKed as a refusal, on the same stream, and the configuration
    in force keeps serving; it ended the stream, and each push of the same state ended the
    next one, reconnecting for good."""
    versions = snapshots(servers)
    control_plane.set_snapshot(*versions[0])
    harness = Harness(config_yaml(control_plane.port))
    try:
        harness.wait(acked("1"))
        real = XdsClient._translate

        def faulty(self: XdsClient, candidate: Any, left_out: Any, unused: Any) -> Any:
            if control_plane.snapshot.version == "2":
                raise AttributeError("'NoneType' object has no attribute 'port_value'")
            return real(self, candidate, left_out, unused)

        monkeypatch.setattr(XdsClient, "_translate", faulty)
        control_plane.set_snapshot("2", versions[1][1])
        control_plane.wait(lambda _r: bool(control_plane.nacks(CLUSTER_TYPE)))
        (nack, *_) = control_plane.nacks(CLUSTER_TYPE)
        assert nack.error is not None and "internal error: AttributeError" in nack.error
        assert harness.client.reconnects == 0 and harness.client.connected
        caller = Caller(harness.port)
        try:
            assert set(caller.next(10)) <= {"v1a", "v1b"}  # version 1 serves on
        finally:
            caller.close()
        control_plane.set_snapshot(*versions[2])
        harness.wait(acked("3"))
        assert harness.client.reconnects == 0
    finally:
        harness.close()


def test_updates_take_effect_without_a_failed_request(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    versions = snapshots(servers)
    control_plane.set_snapshot(*versions[0])
    harness = Harness(config_yaml(control_plane.port))
    try:
        harness.wait(acked("1"))
        caller = Caller(harness.port)
        try:
            assert set(caller.next(20)) == {"v1a", "v1b"}  # 1: sayHello to subset v1
            control_plane.set_snapshot(*versions[1])
            harness.wait(acked("2"))
            assert caller.next(20) == {"v2": 20}  # 2: the route changed to v2
            control_plane.set_snapshot(*versions[2])
            harness.wait(acked("3"))
            assert set(caller.next(60)) == {"v1a", "v1b", "v2"}  # 3: 50/50 between subsets
            control_plane.set_snapshot(*versions[3])
            harness.wait(acked("4"))
            assert set(caller.next(60)) == {"v1b", "v2"}  # 4: v1a is gone from EDS
            # A snapshot the engine refuses: NACKed, with the last good version, same nonce.
            bad = {**versions[3][1], ROUTE_TYPE: [refused_route("5")]}
            control_plane.set_snapshot("5", bad)
            harness.wait(lambda c: c.types[ROUTE_TYPE].nacks == 1)
            control_plane.wait(lambda _r: bool(control_plane.nacks(ROUTE_TYPE)))
            (nack,) = control_plane.nacks(ROUTE_TYPE)
            assert nack.version == "4" and nack.nonce
            assert nack.error is not None and "retry_policy: not supported" in nack.error
            assert set(caller.next(60)) == {"v1b", "v2"}  # nothing changed
            whole = harness.dump()
            assert whole["version"] == "cds:5 eds:5 rds:4"  # what serves, by xDS type
            assert (whole["lastReload"]["source"], whole["lastReload"]["result"]) == (
                "xds",
                "refused",
            )
            refused = 'metaprotocol_reloads_total{source="xds",result="refused"}'
            assert harness.call(_stats(harness.engine))[refused] == 1
            dump = whole["xds"]
            assert dump["connected"] is True
            assert dump["rds"]["version"] == "4" and "retry_policy" in dump["rds"]["lastError"]
            assert (dump["cds"]["version"], dump["eds"]["version"]) == ("5", "5")
            # The mesh's other services (a headless one, ORIGINAL_DST, and a DNS one), which
            # nothing here uses, are not translated, and said so.
            assert dump["unusedCount"] == 2 and dump["unusedClusters"] == sorted(MESH_CLUSTERS)
            assert dump["leftOutCount"] == 0
        finally:
            caller.close()
        assert not caller.errors
    finally:
        harness.close()
    for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE):
        assert not control_plane.nacks(type_url)
    first = next(r for r in control_plane.requests if r.node_id)
    assert first.node_id == NODE
    node = control_plane.nodes[0]  # an Istio sidecar's identity, as istiod reads it
    assert node["id"] == NODE and node["cluster"].endswith(".default")
    assert {"CLUSTER_ID", "NAMESPACE", "ISTIO_VERSION", "INSTANCE_IPS"} <= set(node["metadata"])


def test_reconnects_after_the_control_plane_restarts(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    versions = snapshots(servers)
    control_plane.set_snapshot(*versions[0])
    admin = '\n  admin: {bind: "127.0.0.1:0"}'
    harness = Harness(config_yaml(control_plane.port, admin))
    try:
        harness.wait(acked("1"))
        assert admin_dump(harness)["xds"]["connected"] is True
        caller = Caller(harness.port)
        try:
            control_plane.stop()
            harness.wait(lambda c: not c.connected)
            shown = admin_dump(harness)["xds"]  # the admin endpoint shows it as it is now
            assert shown["connected"] is False and shown["lastError"]
            assert set(caller.next(20)) == {"v1a", "v1b"}  # the last good version serves
            control_plane.set_snapshot(*versions[1])
            control_plane.start()
            harness.wait(lambda c: c.connected and acked("2")(c))
            assert caller.next(20) == {"v2": 20}
            shown = admin_dump(harness)["xds"]
            assert shown["connected"] is True and shown["rds"]["version"] == "2"
            assert harness.client.reconnects >= 1
        finally:
            caller.close()
        assert not caller.errors
    finally:
        harness.close()
    # The new stream asked for what the client held: version 1, no nonce.
    resumed = [r for r in control_plane.requests if r.version == "1" and not r.nonce]
    assert {r.type_url for r in resumed} >= {CLUSTER_TYPE, ROUTE_TYPE}


def test_a_control_plane_gone_silent_is_noticed_by_keepalive_and_the_stream_reopened(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    """The connection stays open but nothing comes back (the node vanished, a NAT entry
    expired): without keepalive the client believes it is connected and serves its last
    version forever. With it, the unanswered PING ends the stream and a new one gets the
    next version."""
    versions = snapshots(servers)
    control_plane.set_snapshot(*versions[0])
    hole = BlackHole(control_plane.port)
    keepalive = "\n    keepalive: {time: 1s, timeout: 1s}"
    harness = Harness(config_yaml(hole.port, keepalive))
    try:
        harness.wait(acked("1"))
        assert harness.client.reconnects == 0
        hole.swallow()
        control_plane.set_snapshot(*versions[1])  # pushed into the silent connection
        harness.wait(lambda c: c.connected and acked("2")(c), timeout=30)
        assert harness.client.reconnects == 1  # the pings cost no reconnect before
        caller = Caller(harness.port)
        try:
            assert caller.next(10) == {"v2": 10}
        finally:
            caller.close()
    finally:
        harness.close()
        hole.close()


def test_keepalive_settings_are_checked() -> None:
    for bad, why in [
        ("{time: 500ms}", "spec.xds.keepalive.time: must be between 1s and 24h"),
        ("{timeout: 2h}", "spec.xds.keepalive.timeout: must be between 1s and 1h"),
        ("{every: 1s}", "every"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(why)):
            loads_config(config_yaml(1, f"\n    keepalive: {bad}"))
    xds = loads_config(config_yaml(1)).proxy.xds
    assert xds is not None and (xds.keepalive_time, xds.keepalive_timeout) == (330.0, 20.0)


def test_a_response_above_the_size_limit_is_refused_and_the_last_version_serves(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    versions = snapshots(servers)
    control_plane.set_snapshot(*versions[0])
    harness = Harness(config_yaml(control_plane.port, "\n    maxMessageBytes: 4096"))
    try:
        harness.wait(acked("1"))
        many = [MetaRoute(f"r{i}", [(f"outbound|{PORT}|v2|{HOST}", 100)]) for i in range(200)]
        huge = {**versions[1][1], ROUTE_TYPE: [route_configuration(RDS_NAME, many)]}
        control_plane.set_snapshot("2", huge)
        harness.wait(lambda c: "RESOURCE_EXHAUSTED" in (c.last_error or ""))
        caller = Caller(harness.port)
        try:
            assert set(caller.next(10)) == {"v1a", "v1b"}  # routes of version 1 still serve
            assert harness.client.types[ROUTE_TYPE].version == "1"
        finally:
            caller.close()
    finally:
        harness.close()


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    settings = Xds("a:1", XdsNode("n", "c"), backoff_initial=0.5, backoff_max=4.0)
    assert [backoff_delay(n, settings, 1.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]
    assert backoff_delay(3, settings, 0.0) == 1.0  # jitter takes up to half off
    assert backoff_delay(10_000, settings, 1.0) == 4.0


OTHER_SERVICE = """
kind: ServiceEntry
metadata: {name: other}
spec:
  hosts: [other.svc]
  ports: [{number: 9091, name: tcp-metaprotocol-thrift-other}]
---"""


def test_a_file_reload_keeps_the_routes_of_the_control_plane(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    versions = snapshots(servers)
    control_plane.set_snapshot(*versions[1])  # sayHello to v2
    harness = Harness(config_yaml(control_plane.port))
    try:
        harness.wait(acked("2"))
        caller = Caller(harness.port)
        try:
            listeners = f'[{{host: {HOST}, port: {PORT}, bind: "127.0.0.1:0"}}]'
            both = listeners[:-1] + ', {host: other.svc, port: 9091, bind: "127.0.0.1:0"}]'
            other = OTHER_SERVICE + config_yaml(control_plane.port).replace(listeners, both)
            harness.call(harness.client.rebase(loads_config(other)))
            assert caller.next(20) == {"v2": 20}  # the xDS routes still serve
            # The new listener's route table is subscribed to on the open stream.
            control_plane.wait(
                lambda reqs: any(
                    r.type_url == ROUTE_TYPE and "other.svc_9091" in r.names for r in reqs
                )
            )
            moved = loads_config(config_yaml(control_plane.port + 1))
            with pytest.raises(ConfigError, match=r"spec\.xds changed"):
                harness.call(harness.client.rebase(moved))
        finally:
            caller.close()
        assert not caller.errors
    finally:
        harness.close()


def split(resources: dict[str, list[Any]]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """istiod's part (clusters, endpoints) and Aeraki's part (routes) of a snapshot."""
    istiod = {t: r for t, r in resources.items() if t != ROUTE_TYPE}
    return istiod, {ROUTE_TYPE: resources[ROUTE_TYPE]}


def test_routes_from_aeraki_and_clusters_from_istiod(servers: dict[str, HelloServer]) -> None:
    """The mesh's real shape: Aeraki serves MetaRDS on its own RouteDiscoveryService,
    istiod serves clusters and endpoints over ADS; the engine holds a stream to each."""
    versions = snapshots(servers)
    istiod, aeraki = ControlPlane().start(), ControlPlane(service="rds").start()
    try:
        clusters, routes = split(versions[0][1])
        istiod.set_snapshot("1", clusters)
        aeraki.set_snapshot("1", routes)
        extra = f'\n    rdsAddress: "127.0.0.1:{aeraki.port}"'
        harness = Harness(config_yaml(istiod.port, extra))
        try:
            harness.wait(acked("1"))
            caller = Caller(harness.port)
            try:
                assert set(caller.next(20)) == {"v1a", "v1b"}
                aeraki.set_snapshot("2", split(versions[2][1])[1])  # Aeraki: 50/50
                harness.wait(lambda c: c.types[ROUTE_TYPE].version == "2")
                assert set(caller.next(60)) == {"v1a", "v1b", "v2"}
                istiod.set_snapshot("2", split(versions[3][1])[0])  # istiod: v1a removed
                harness.wait(acked("2"))
                assert set(caller.next(60)) == {"v1b", "v2"}
                streams = harness.dump()["xds"]["streams"]
                assert streams["rds"]["address"] == f"127.0.0.1:{aeraki.port}"
                assert streams["rds"]["types"] == ["rds"] and streams["ads"]["connected"]
            finally:
                caller.close()
            assert not caller.errors
        finally:
            harness.close()
        assert {r.type_url for r in aeraki.requests} == {ROUTE_TYPE}
        assert {r.type_url for r in istiod.requests} == {CLUSTER_TYPE, ENDPOINT_TYPE}
        assert aeraki.acked(ROUTE_TYPE, "2", NODE) and istiod.acked(ENDPOINT_TYPE, "2", NODE)
    finally:
        istiod.close()
        aeraki.close()


def test_pushes_that_rename_the_route_keep_the_stats_bounded_and_right(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    """A control plane that names its route anew in every push, while a client keeps
    calling: the engine holds the series of the names it serves (and of those requests in
    flight still use), not of every name it was ever sent, and the request totals agree with
    the replies the client got. (Renamed clusters: tests/proxy/test_stats_reload.py.)"""
    name = f"outbound|{PORT}|v1|{HOST}"
    endpoints = [("127.0.0.1", servers["v1a"].port)]

    def renamed(i: int) -> dict[str, list[Any]]:
        return {
            CLUSTER_TYPE: [cluster(name)],
            ENDPOINT_TYPE: [load_assignment(name, endpoints)],
            ROUTE_TYPE: [route_configuration(RDS_NAME, [MetaRoute(f"route{i}", [(name, 100)])])],
        }

    control_plane.set_snapshot("1", renamed(1))
    harness = Harness(config_yaml(control_plane.port))
    try:
        harness.wait(acked("1"))
        caller = Caller(harness.port)
        sizes: list[int] = []
        try:
            for i in range(2, 42):
                control_plane.set_snapshot(str(i), renamed(i))
                harness.wait(acked(str(i)))
                assert caller.next(3) == {"v1a": 3}
                sizes.append(len(harness.call(_stats(harness.engine))))
        finally:
            caller.close()
        assert not caller.errors
        # Bounded: the series of one configuration (and of the previous one while a request
        # in flight holds it, until the next sweep), not one more set per push (which was
        # about 45 keys a push before series were dropped).
        assert max(sizes[20:]) <= max(sizes[:20]), sizes
        stats = harness.call(_stats(harness.engine))
        old = [k for k in stats if any(f'route="route{n}"' in k for n in range(1, 40))]
        assert not old, old[:3]
        requests = sum(v for k, v in stats.items() if k.startswith("metaprotocol_requests_total"))
        assert requests == len(caller.replies)
    finally:
        harness.close()


def _renamed(i: int, endpoints: list[tuple[str, int]]) -> dict[str, list[Any]]:
    """Version ``i`` of a control plane that names the cluster anew in every push (as a
    subset renamed in a DestinationRule does): the new cluster, its endpoints and the route
    to it in one snapshot, the old cluster gone from it."""
    name = f"outbound|{PORT}|v{i}|{HOST}"
    return {
        CLUSTER_TYPE: [cluster(name)],
        ENDPOINT_TYPE: [load_assignment(name, endpoints)],
        ROUTE_TYPE: [route_configuration(RDS_NAME, [MetaRoute("to-v", [(name, 100)])])],
    }


def test_pushes_that_rename_the_cluster_fail_no_request(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    """CDS drops the old cluster before RDS moves the route off it, and RDS arrives before
    the new cluster's endpoints (the server answers the EDS subscription to the new name
    after its RDS push): make before break needs both halves. The old cluster stays, with
    its endpoints, while the routes in force send to it; the route update waits for the new
    cluster's endpoints. Without the first, requests got ``no endpoint in ...|v1|...``;
    without the second, ``no endpoint in ...|v2|...``."""
    endpoints = [("127.0.0.1", servers["v1a"].port)]
    control_plane.set_snapshot("1", _renamed(1, endpoints))
    harness = Harness(config_yaml(control_plane.port))
    try:
        harness.wait(acked("1"))
        caller = Caller(harness.port)
        try:
            for i in range(2, 12):
                control_plane.set_snapshot(str(i), _renamed(i, endpoints))
                harness.wait(acked(str(i)))
                assert caller.next(3) == {"v1a": 3}
        finally:
            caller.close()
        assert not caller.errors, caller.errors
        # Kept clusters go with the routes that sent to them: only the last one is served.
        assert list(harness.client.clusters) == [f"outbound|{PORT}|v11|{HOST}"]
        xds = harness.dump()["xds"]
        assert xds["keptClusters"] == [] and xds["heldRoutes"] is None
        assert xds["eds"]["subscribed"] == [f"outbound|{PORT}|v11|{HOST}"]
    finally:
        harness.close()


def test_a_route_update_waits_for_the_endpoints_of_a_new_cluster(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    """A route to a cluster whose endpoints have not arrived is held (the old routes serve,
    the update is neither applied nor ACKed) until they arrive."""
    v1 = f"outbound|{PORT}|v1|{HOST}"
    v2 = f"outbound|{PORT}|v2|{HOST}"
    first = _renamed(1, [("127.0.0.1", servers["v1a"].port)])
    control_plane.set_snapshot("1", first)
    harness = Harness(config_yaml(control_plane.port, "\n    initialFetchTimeout: 1h"))
    try:
        harness.wait(acked("1"))
        # v2 is listed and routed to, but the server has no endpoints for it yet.
        control_plane.set_snapshot(
            "2",
            {
                CLUSTER_TYPE: [cluster(v1), cluster(v2)],
                ENDPOINT_TYPE: first[ENDPOINT_TYPE],
                ROUTE_TYPE: [route_configuration(RDS_NAME, [MetaRoute("to-v", [(v2, 100)])])],
            },
        )
        harness.wait(lambda c: c.held is not None and c.types[CLUSTER_TYPE].version == "2")
        assert harness.client.held is not None and harness.client.held.clusters == [v2]
        assert harness.client.types[ROUTE_TYPE].version == "1"  # not ACKed meanwhile
        caller = Caller(harness.port)
        try:
            assert caller.next(3) == {"v1a": 3}  # the routes in force still serve
            # Its endpoints arrive: the held update applies at once, long before the timeout.
            control_plane.set_snapshot(
                "3",
                {
                    CLUSTER_TYPE: [cluster(v1), cluster(v2)],
                    ENDPOINT_TYPE: [
                        *first[ENDPOINT_TYPE],
                        load_assignment(v2, [("127.0.0.1", servers["v2"].port)]),
                    ],
                    ROUTE_TYPE: [route_configuration(RDS_NAME, [MetaRoute("to-v", [(v2, 100)])])],
                },
            )
            harness.wait(acked("3"))
            assert caller.next(3) == {"v2": 3}
        finally:
            caller.close()
        assert not caller.errors, caller.errors
        assert harness.client.held is None
    finally:
        harness.close()


def test_a_route_update_to_a_host_held_but_unused_translates_it_and_asks_its_endpoints(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    """istiod sends every service of the mesh; only the hosts in use are translated and have
    their endpoints asked for (all were: 40 000 small clusters took 254 MiB and 4.9 s of CPU
    per update). A route update that starts sending to a held host waits for its endpoints,
    now asked for, while the routes in force serve, then applies: calls reach it, none
    fails. The update that stops sending to it drops its endpoints and subscription."""
    other = f"outbound|{PORT}||other.svc"
    unused = [cluster(f"outbound|9000||b{i}.svc") for i in range(300)]
    snap = dict(snapshots(servers)[0][1])
    snap[CLUSTER_TYPE] = [*snap[CLUSTER_TYPE], cluster(other), *unused]
    snap[ENDPOINT_TYPE] = [
        *snap[ENDPOINT_TYPE],
        load_assignment(other, [("127.0.0.1", servers["v2"].port)]),
        *(load_assignment(c.name, [("10.0.0.1", 9000)]) for c in unused),
    ]
    routes = snap[ROUTE_TYPE]
    control_plane.set_snapshot("1", snap)
    harness = Harness(config_yaml(control_plane.port, "\n    initialFetchTimeout: 1h"))
    try:
        harness.wait(acked("1"))
        assert set(harness.engine.config.services) == {HOST}
        eds = harness.client.types[ENDPOINT_TYPE]
        assert eds.names and all(name.endswith(f"|{HOST}") for name in eds.names), eds.names
        assert all(name.endswith(f"|{HOST}") for name in eds.resources)
        # Held as they came, decoded when read: a decoded cluster took 10 to 50 times that.
        assert all(isinstance(c, bytes) for c in harness.client.clusters.values())
        status = harness.dump()["xds"]
        assert status["unusedCount"] == 301 + len(MESH_CLUSTERS)
        assert status["unusedClusters"][:3] == [*sorted(MESH_CLUSTERS), "outbound|9000||b0.svc"]
        assert len(status["unusedClusters"]) == 100  # the first, by name
        caller = Caller(harness.port)
        try:
            assert set(caller.next(20)) == {"v1a", "v1b"}
            to_other = MetaRoute("hello", [(other, 100)], exact={"method": "sayHello"})
            rest = MetaRoute("rest", [(f"outbound|{PORT}|v1|{HOST}", 100)])
            snap[ROUTE_TYPE] = [route_configuration(RDS_NAME, [to_other, rest])]
            control_plane.set_snapshot("2", snap)
            harness.wait(acked("2"))
            assert caller.next(20) == {"v2": 20}
            assert harness.client.held is None
            assert set(harness.engine.config.services) == {HOST, "other.svc"}
            assert other in eds.names and other in eds.resources
            assert harness.dump()["xds"]["unusedCount"] == 300 + len(MESH_CLUSTERS)
            # Back: its endpoints are no longer asked for, nor held.
            snap[ROUTE_TYPE] = routes
            control_plane.set_snapshot("3", snap)
            harness.wait(acked("3"))
            assert set(caller.next(20)) == {"v1a", "v1b"}
        finally:
            caller.close()
        assert not caller.errors, caller.errors
        assert other not in eds.names and other not in eds.resources
        assert set(harness.engine.config.services) == {HOST}
        assert len(control_plane.nacks(ENDPOINT_TYPE)) == 0
    finally:
        harness.close()


def test_a_held_route_update_applies_after_initial_fetch_timeout(
    control_plane: ControlPlane, servers: dict[str, HelloServer]
) -> None:
    """Endpoints that never come do not hold routes back for good: after
    ``initialFetchTimeout`` the update applies and is ACKed (its cluster selects no endpoint,
    as Envoy's does once warming gives up)."""
    v9 = f"outbound|{PORT}|v9|{HOST}"
    control_plane.set_snapshot(
        "1",
        {
            CLUSTER_TYPE: [cluster(v9)],
            ENDPOINT_TYPE: [],
            ROUTE_TYPE: [route_configuration(RDS_NAME, [MetaRoute("to-v9", [(v9, 100)])])],
        },
    )
    harness = Harness(config_yaml(control_plane.port, "\n    initialFetchTimeout: 200ms"))
    try:
        harness.wait(acked("1"))
        assert harness.client.held is None
        (listener,) = harness.dump()["listeners"]
        assert [r["name"] for r in listener["routes"]] == ["to-v9"]
    finally:
        harness.close()


def test_initial_fetch_timeout_is_checked() -> None:
    for bad, why in [
        ("0s", "spec.xds.initialFetchTimeout: duration must be positive"),
        ("2h", "spec.xds.initialFetchTimeout: must be between 10ms and 1h"),
        ("soon", "spec.xds.initialFetchTimeout"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(why)):
            loads_config(config_yaml(1, f"\n    initialFetchTimeout: {bad}"))
    xds = loads_config(config_yaml(1)).proxy.xds
    assert xds is not None and xds.initial_fetch_timeout == 15.0


# -- TLS to the upstreams, from the control plane ---------------------------------------------


class TlsHelloServer(HelloServer):
    """A :class:`HelloServer` behind TLS with ``context`` (which may require a client
    certificate); ``sni`` records the server name of each handshake."""

    def __init__(self, version: str, context: ssl.SSLContext, sni: list[str | None]) -> None:
        super().__init__(version)
        self.context = context
        context.sni_callback = lambda _sock, name, _ctx: sni.append(name)

    def _serve(self, conn: socket.socket) -> None:
        try:
            wrapped = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):  # a handshake the client gave up: nothing to serve
            conn.close()
            return
        with self._lock:
            self._clients.discard(conn)
            self._clients.add(wrapped)
        super()._serve(wrapped)


def test_a_tls_cluster_from_the_control_plane_is_reached_over_tls(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """istiod's cluster for a DestinationRule tls MUTUAL with files: the engine connects to
    servers that require its client certificate, sends the cluster's SNI and verifies the
    server's certificate for it; a CA file that is missing NACKs the update and the clusters
    in force keep serving; a wrong CA makes the handshake fail, verified, as designed."""
    ca, other = trustme.CA(), trustme.CA()
    ca_file, other_file = str(tmp_path / "ca.pem"), str(tmp_path / "other.pem")
    ca.cert_pem.write_to_path(ca_file)
    other.cert_pem.write_to_path(other_file)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("tls.hello.svc").configure_cert(server)
    server.load_verify_locations(ca_file)
    server.verify_mode = ssl.CERT_REQUIRED  # the engine must send its certificate
    leaf = ca.issue_cert("engine.local")
    cert, key = str(tmp_path / "engine.pem"), str(tmp_path / "engine.key")
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    sni: list[str | None] = []
    tls_servers = {n: TlsHelloServer(n, server, sni).start() for n in ("v1a", "v1b", "v2")}

    def version(ca_path: str) -> dict[str, list[Any]]:
        resources = snapshots(tls_servers)[0][1]
        socket_ = tls_socket(ca_path, (cert, key), sni="tls.hello.svc")
        resources[CLUSTER_TYPE] = [tls_cluster(c.name, socket_) for c in resources[CLUSTER_TYPE]]
        return resources

    control_plane.set_snapshot("1", version(ca_file))
    harness = Harness(config_yaml(control_plane.port))
    try:
        harness.wait(acked("1"))
        caller = Caller(harness.port)
        try:
            assert set(caller.next(20)) == {"v1a", "v1b"}
            assert sni and set(sni) == {"tls.hello.svc"}
            clusters = {c["name"]: c for c in harness.dump()["clusters"]}
            tls = clusters[f"outbound|{PORT}|v1|{HOST}"]["tls"]
            assert (tls["mode"], tls["caCertificates"], tls["clientCertificate"]) == (
                "MUTUAL",
                ca_file,
                cert,
            )
            stats = harness.call(_stats(harness.engine))
            assert stats[
                f'metaprotocol_tls_handshakes_total{{cluster="outbound|{PORT}|v1|{HOST}"}}'
            ]
            # A CA file that is not there: NACKed, naming the field; nothing changes.
            missing = str(tmp_path / "missing.pem")
            control_plane.set_snapshot("2", version(missing))
            harness.wait(lambda c: c.types[CLUSTER_TYPE].nacks == 1)
            control_plane.wait(lambda _r: bool(control_plane.nacks(CLUSTER_TYPE)))
            (nack,) = control_plane.nacks(CLUSTER_TYPE)
            assert nack.version == "1" and nack.error is not None
            assert "validation_context_sds_secret_config.name: no such file: " in nack.error
            assert missing in nack.error
            assert set(caller.next(20)) == {"v1a", "v1b"}
        finally:
            caller.close()
        assert not caller.errors
        # A CA that did not sign the servers' certificates: applied, and every handshake
        # fails verification (the request gets the protocol's error, the server nothing).
        control_plane.set_snapshot("3", version(other_file))
        harness.wait(acked("3"))
        rpc, tt = untyped("thriftpy2.rpc"), untyped("thriftpy2.transport")
        client = rpc.make_client(
            hello().Hello,
            "127.0.0.1",
            harness.port,
            trans_factory=tt.TFramedTransportFactory(),
            timeout=10_000,
        )
        try:
            with pytest.raises(Exception, match="certificate verify failed"):
                client.sayHello("xds")
        finally:
            client.close()
    finally:
        harness.close()
        for s in tls_servers.values():
            s.close()


# -- per-port policies: two ports of one host ---------------------------------------------------


class HelloServerAt(HelloServer):
    """A :class:`HelloServer` on another loopback ``address`` (a multi-port host's endpoint
    is one address with a port per service port)."""

    def __init__(self, version: str, address: str) -> None:
        super().__init__(version)
        self._listener.close()
        self._listener = socket.create_server((address, 0))
        self.port = self._listener.getsockname()[1]


def test_two_ports_of_a_host_with_their_own_policies_are_applied(
    control_plane: ControlPlane,
) -> None:
    """istiod's clusters for a DestinationRule with portLevelSettings
    (:func:`port_policy_snapshot`): the engine ACKs them (it NACKed per-port policies
    before), gives each port's cluster its own policy, and balances each its own way."""
    other = OTHER_PORT
    servers = {
        f"{side}{port}": HelloServerAt(f"{side}{port}", address).start()
        for port in (PORT, other)
        for side, address in (("a", "127.0.0.1"), ("b", "127.0.0.2"))
    }
    names = {port: f"outbound|{port}||{HOST}" for port in (PORT, other)}
    resources = port_policy_snapshot(
        {port: servers[f"a{port}"].port for port in (PORT, other)},
        {port: servers[f"b{port}"].port for port in (PORT, other)},
    )
    control_plane.set_snapshot("1", resources)
    harness = Harness(config_yaml(control_plane.port))
    try:
        harness.wait(lambda c: acked("1")(c) or c.types[CLUSTER_TYPE].nacks > 0)
        assert harness.client.types[CLUSTER_TYPE].nacks == 0, harness.dump()["xds"]
        harness.wait(acked("1"))
        clusters = {c["name"]: c for c in harness.dump()["clusters"]}
        got = {
            port: (
                clusters[names[port]]["loadBalancer"],
                clusters[names[port]]["hashAttribute"],
                clusters[names[port]]["connectionPool"],
            )
            for port in (PORT, other)
        }
        assert got[PORT][:2] == ("RoundRobin", None)
        assert got[PORT][2]["max_connections"] == 3 and got[PORT][2]["max_requests"] is None
        # Where istiod writes the pool's lifetimes and keepalive (they were ignored).
        assert got[PORT][2]["idle_timeout"] == 300.0
        assert got[PORT][2]["max_requests_per_connection"] == 1000
        assert got[PORT][2]["keepalive"] == {"probes": 3, "time": 600.0, "interval": 60.0}
        assert got[other][:2] == ("ConsistentHash", "method")
        assert got[other][2]["max_requests"] == 7 and got[other][2]["max_connections"] is None
        # Subset v1 on port 9091 (not routed to) has its own policy, not the port's.
        v1 = harness.engine.config.destination_rules[HOST].policy_for(other, "v1")
        assert v1.load_balancer == LoadBalancer("LEAST_REQUEST")
        assert v1.outlier_detection is not None and v1.outlier_detection.consecutive_errors == 3
        assert v1.outlier_detection.min_health_percent == 0  # istiod's panic threshold
        assert v1.connection_pool is not None and v1.connection_pool.max_requests is None
        caller = Caller(harness.port)
        try:
            replies = caller.next(80)
        finally:
            caller.close()
        assert not caller.errors
        # Port 9090 takes turns; port 9091 always picks the endpoint `sayHello` hashes to.
        assert {f"a{PORT}", f"b{PORT}"} <= set(replies)
        assert len({r for r in replies if r.endswith(str(other))}) == 1
    finally:
        harness.close()
        for s in servers.values():
            s.close()


def test_failover_priorities_keep_traffic_near_until_ejections(
    control_plane: ControlPlane,
) -> None:
    """istiod's locality failover (:func:`failover_snapshot`): the engine ACKs it (it NACKed
    priorities before) and sends everything to priority 0 (a, b) while it is healthy; with b
    ejected (1 of 2 healthy: 70%) 30% spills to priority 1 (c), in a smooth round robin;
    with b back, all returns to priority 0."""
    servers = {name: HelloServer(name).start() for name in ("a", "b", "c")}
    near = [("127.0.0.1", servers["a"].port), ("127.0.0.1", servers["b"].port)]
    control_plane.set_snapshot("1", failover_snapshot(near, [("127.0.0.1", servers["c"].port)]))
    harness = Harness(config_yaml(control_plane.port))
    name = f"outbound|{PORT}||{HOST}"
    try:
        harness.wait(lambda c: acked("1")(c) or c.types[ENDPOINT_TYPE].nacks > 0)
        assert harness.client.types[ENDPOINT_TYPE].nacks == 0, harness.dump()["xds"]
        harness.wait(acked("1"))
        (dumped,) = [c for c in harness.dump()["clusters"] if c["name"] == name]
        by_port = {
            int(key.rsplit(":", 1)[1]): p
            for key, p in zip(dumped["endpoints"], dumped["priorities"], strict=True)
        }
        assert by_port == {servers["a"].port: 0, servers["b"].port: 0, servers["c"].port: 1}
        assert dumped["priorityLoad"] == {"0": 100, "1": 0}
        cluster = harness.engine.clusters[name]
        b = next(h for h in cluster.hosts if h.port == servers["b"].port)

        async def set_health(ejected: bool) -> None:
            assert cluster.outlier is not None  # the detector istiod's fields configure
            if ejected:
                cluster.outlier.eject(b)
            else:
                cluster.outlier.readmit(b)

        caller = Caller(harness.port)
        try:
            assert caller.next(40) == {"a": 20, "b": 20}
            harness.call(set_health(True))
            assert cluster.priority_load == {0: 70, 1: 30}
            assert caller.next(100) == {"a": 70, "c": 30}
            harness.call(set_health(False))
            assert set(caller.next(40)) == {"a", "b"}
        finally:
            caller.close()
        assert not caller.errors
    finally:
        harness.close()
        for s in servers.values():
            s.close()


def test_locality_weights_split_traffic_and_move_with_ejections(
    control_plane: ControlPlane,
) -> None:
    """istiod's ``distribute`` as it arrives: both zones at priority 0, zone a (a, b) with
    locality weight 80 and zone b (c) with 20, and ``locality_weighted_lb_config`` on the
    clusters. The engine ACKs it (it NACKed weights not in proportion to the endpoints') and
    sends 80% to zone a, 20% to c, though zone a has two endpoints to c's one; with b ejected
    zone a is 70% available: 80 x 70 against 20 x 100, 14 : 5 in a smooth round robin."""
    servers = {name: HelloServer(name).start() for name in ("a", "b", "c")}
    near = [("127.0.0.1", servers["a"].port), ("127.0.0.1", servers["b"].port)]
    snap = distribute_snapshot(near, [("127.0.0.1", servers["c"].port)])
    control_plane.set_snapshot("1", snap)
    harness = Harness(config_yaml(control_plane.port))
    name = f"outbound|{PORT}||{HOST}"
    try:
        harness.wait(lambda c: acked("1")(c) or c.types[ENDPOINT_TYPE].nacks > 0)
        assert harness.client.types[ENDPOINT_TYPE].nacks == 0, harness.dump()["xds"]
        (dumped,) = [c for c in harness.dump()["clusters"] if c["name"] == name]
        weights = {
            int(key.rsplit(":", 1)[1]): (locality, weight)
            for key, locality, weight in zip(
                dumped["endpoints"], dumped["localities"], dumped["localityWeights"], strict=True
            )
        }
        assert weights == {
            servers["a"].port: ("region/a/", 80),
            servers["b"].port: ("region/a/", 80),
            servers["c"].port: ("region/b/", 20),
        }
        assert dumped["loadBalancer"] == "LocalityBalancer"
        cluster = harness.engine.clusters[name]
        b = next(h for h in cluster.hosts if h.port == servers["b"].port)

        async def eject() -> None:
            assert cluster.outlier is not None
            cluster.outlier.eject(b)

        caller = Caller(harness.port)
        try:
            assert caller.next(100) == {"a": 40, "b": 40, "c": 20}
            harness.call(eject())
            assert caller.next(95) == {"a": 70, "c": 25}
        finally:
            caller.close()
        assert not caller.errors
    finally:
        harness.close()
        for s in servers.values():
            s.close()
