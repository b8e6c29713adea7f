"""Configuration reloads while serving (Engine.apply): routes, clusters, listeners, codecs."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from proxy_kit import (
    RESPONSE,
    Client,
    KVServer,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    http_get,
    loop_stood_during,
    mesh,
    run,
)

from metaprotocol_sdk import ConfigError, Metadata
from metaprotocol_sdk.proxy import Engine, loads_config

TO_V1 = """\
- name: all
  route: [{destination: {host: svc.test, subset: v1}}]
"""
TO_V2 = """\
- name: all
  route: [{destination: {host: svc.test, subset: v2}}]
"""


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait for a condition the engine reaches on its own (polled, bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"not reached: {what}"
        await asyncio.sleep(0.01)


async def dump(engine: Engine) -> dict[str, object]:
    assert engine.admin_address is not None
    status, body = await http_get(engine.admin_address, "/config_dump")
    assert status == 200
    return dict(json.loads(body))


def test_route_change_reaches_open_connections_and_in_flight_keeps_its_route() -> None:
    async def main() -> None:
        a = await Upstream("a").start()
        b = await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v2")]
        async with engine_for(mesh(endpoints, router=TO_V1)) as engine:
            c = await Client.connect(address(engine))
            assert (await c.call()).attributes.get("server") == "a"
            slow = c.start("slow")  # in flight on route "all" -> v1 during the swap
            await a.wait_received(2)
            before = engine.config_version
            assert (await dump(engine))["version"] == before
            await engine.apply(loads_config(mesh(endpoints, router=TO_V2), "t2.yaml"))
            assert engine.config_version != before
            # The same connection, a new request: the new route.
            assert (await c.call()).attributes.get("server") == "b"
            a.release.set()
            reply = await asyncio.wait_for(slow, 5)
            assert error_type(reply) is None and reply.attributes.get("server") == "a"
            fresh = await Client.connect(address(engine))
            assert (await fresh.call()).attributes.get("server") == "b"
            assert engine.stats.get("metaprotocol_reloads_total", source="file", result="ok") == 1
            view = await dump(engine)
            assert view["version"] == engine.config_version
            last = view["lastReload"]
            assert isinstance(last, dict)
            assert (last["source"], last["result"], last["error"]) == ("file", "ok", None)
            c.close()
            fresh.close()
        await a.close()
        await b.close()

    run(main())


def test_a_refused_reload_changes_nothing_and_is_shown() -> None:
    async def main() -> None:
        a = await Upstream("a").start()
        b = await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v2")]
        async with engine_for(mesh(endpoints, router=TO_V1)) as engine:
            c = await Client.connect(address(engine))
            assert (await c.call()).attributes.get("server") == "a"
            serving = engine.config_version
            # Routes to v2 and a timeout change: valid YAML, but timeouts apply at start only.
            bad = loads_config(mesh(endpoints, router=TO_V2, proxy="timeouts: {idle: 5s}\n"))
            with pytest.raises(ConfigError, match=r"spec\.timeouts changed.*restart needed"):
                await engine.apply(bad, source="sighup")
            assert engine.config_version == serving
            assert (await c.call()).attributes.get("server") == "a"  # old routes serve
            assert (
                engine.stats.get("metaprotocol_reloads_total", source="sighup", result="refused")
                == 1
            )
            view = await dump(engine)
            assert view["version"] == serving
            last = view["lastReload"]
            assert isinstance(last, dict) and last["result"] == "refused"
            assert "spec.timeouts" in str(last["error"])
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_a_removed_cluster_drains_its_upstream_connections() -> None:
    async def main() -> None:
        a = await Upstream("a").start()
        b = await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v2")]
        async with engine_for(mesh(endpoints, router=TO_V1)) as engine:
            c = await Client.connect(address(engine))
            slow = c.start("slow")
            await a.wait_received(1)
            await engine.apply(loads_config(mesh(endpoints, router=TO_V2)))
            assert "outbound|9000|v1|svc.test" not in engine.clusters
            # Not cut: the request in flight on it is answered, then the connection closes.
            assert len(a.connections) == 1
            assert (await c.call()).attributes.get("server") == "b"
            a.release.set()
            reply = await asyncio.wait_for(slow, 5)
            assert error_type(reply) is None and reply.attributes.get("server") == "a"
            await until(lambda: not a.connections, "the drained connection closes")
            assert engine.stats.total("metaprotocol_upstream_resets_total") == 0
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_a_drained_cluster_is_closed_at_the_drain_deadline() -> None:
    async def main() -> None:
        a = await Upstream("a").start()
        b = await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v2")]
        drain = "timeouts: {drain: 0.2s}\n"
        async with engine_for(mesh(endpoints, router=TO_V1, proxy=drain)) as engine:
            c = await Client.connect(address(engine))
            hung = c.start("hang")
            await a.wait_received(1)
            await engine.apply(loads_config(mesh(endpoints, router=TO_V2, proxy=drain)))
            reply = await asyncio.wait_for(hung, 5)  # the deadline closed it: a local reply
            assert error_type(reply) == "UpstreamReset"
            await until(lambda: not a.connections, "the connection is closed")
            assert (await c.call()).attributes.get("server") == "b"
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_a_changed_cluster_serves_new_requests_and_drains_the_old() -> None:
    async def main() -> None:
        a = await Upstream("a").start()
        b = await Upstream("b").start()
        async with engine_for(mesh([(a.port, "v1")], router=TO_V1)) as engine:
            c = await Client.connect(address(engine))
            assert (await c.call()).attributes.get("server") == "a"
            # v1's endpoint moves from a to b: same cluster name, new definition.
            await engine.apply(loads_config(mesh([(b.port, "v1")], router=TO_V1)))
            assert (await c.call()).attributes.get("server") == "b"
            await until(lambda: not a.connections, "the old cluster's connection closes")
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_an_unchanged_cluster_keeps_its_connections() -> None:
    async def main() -> None:
        a = await Upstream("a").start()
        async with engine_for(mesh([(a.port, "v1")], router=TO_V1)) as engine:
            c = await Client.connect(address(engine))
            assert (await c.call()).attributes.get("server") == "a"
            cluster = engine.clusters["outbound|9000|v1|svc.test"]
            text = mesh([(a.port, "v1")], router=TO_V1.replace("name: all", "name: renamed"))
            await engine.apply(loads_config(text))
            assert engine.clusters["outbound|9000|v1|svc.test"] is cluster
            assert (await c.call()).attributes.get("server") == "a"
            assert a.accepted == 1  # the same upstream connection
            c.close()
        await a.close()

    run(main())


SECOND_SERVICE = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: svc2}}
spec:
  hosts: [svc2.test]
  ports: [{{number: 9000, name: tcp-metaprotocol-kv-svc, protocol: TCP}}]
  resolution: STATIC
  endpoints:
    - {{address: 127.0.0.1, ports: {{tcp-metaprotocol-kv-svc: {port}}}}}
"""
ONE_LISTENER = "listeners: [{host: svc.test, port: 9000, bind: '127.0.0.1:0'}]"


def listeners(*hosts: str) -> Callable[[str], str]:
    """Rewrite a mesh's listeners to one per host (port 9000, ephemeral binds)."""
    items = ", ".join(f"{{host: {h}, port: 9000, bind: '127.0.0.1:0'}}" for h in hosts)
    return lambda text: text.replace(ONE_LISTENER, f"listeners: [{items}]")


def test_listeners_added_and_removed_leave_the_others_undisturbed() -> None:
    async def main() -> None:
        a = await Upstream("a").start()
        b = await Upstream("b").start()
        base = mesh([(a.port, "v1")], router=TO_V1, extra=SECOND_SERVICE.format(port=b.port))
        async with engine_for(base) as engine:
            first = engine.listener_addresses[("svc.test", 9000)]
            c1 = await Client.connect(first)
            slow = c1.start("slow")
            await a.wait_received(1)
            await engine.apply(loads_config(listeners("svc.test", "svc2.test")(base)))
            assert engine.listener_addresses[("svc.test", 9000)] == first
            c2 = await Client.connect(engine.listener_addresses[("svc2.test", 9000)])
            assert (await c2.call()).attributes.get("server") == "b"
            assert (await c1.call()).attributes.get("server") == "a"  # undisturbed
            # Remove the first listener: it stops accepting, its connection drains.
            await engine.apply(loads_config(listeners("svc2.test")(base)))
            assert ("svc.test", 9000) not in engine.listener_addresses
            with pytest.raises(OSError):
                await Client.connect(first)
            late = await c1.call()
            assert error_type(late) == "ShuttingDown"
            a.release.set()
            reply = await asyncio.wait_for(slow, 5)
            assert error_type(reply) is None and reply.attributes.get("server") == "a"
            await asyncio.wait_for(c1.closed, 5)
            assert (await c2.call()).attributes.get("server") == "b"  # undisturbed
            view = await dump(engine)
            assert [lst["name"] for lst in view["listeners"]] == ["svc2.test:9000"]  # type: ignore[index]
            c2.close()
        await a.close()
        await b.close()

    run(main())


def test_a_new_listener_that_cannot_bind_is_refused_whole() -> None:
    async def main() -> None:
        a = await Upstream("a").start()
        b = await Upstream("b").start()
        base = mesh([(a.port, "v1")], router=TO_V1, extra=SECOND_SERVICE.format(port=b.port))
        async with engine_for(base) as engine:
            taken = engine.listener_addresses[("svc.test", 9000)][1]
            text = listeners("svc.test", "svc2.test")(base).replace(
                "{host: svc2.test, port: 9000, bind: '127.0.0.1:0'}",
                f"{{host: svc2.test, port: 9000, bind: '127.0.0.1:{taken}'}}",
            )
            with pytest.raises(ConfigError, match=r"listener svc2\.test:9000.*cannot bind"):
                await engine.apply(loads_config(text.replace("subset: v1", "subset: v2")))
            assert list(engine.listeners) == [("svc.test", 9000)]
            assert "outbound|9000|v2|svc.test" not in engine.clusters
            c = await Client.connect(address(engine))
            assert (await c.call()).attributes.get("server") == "a"
            c.close()
        await a.close()
        await b.close()

    run(main())


class Terse(Upstream):
    """Answers every request with a small reply (no echo of the request's headers)."""

    def on_message(self, conn: KVServer, msg: Metadata) -> None:
        assert conn.transport is not None
        self.received.append(msg)
        conn.transport.write(build_frame(RESPONSE, msg.request_id, {"server": self.name}))


def test_codec_options_apply_to_new_connections_only() -> None:
    async def main() -> None:
        a = await Terse("a").start()
        big = {"x": "y" * 3000}
        roomy = "codecOptions: {kv: {max_frame_size: 65536}}\n"
        tight = "codecOptions: {kv: {max_frame_size: 2048}}\n"
        async with engine_for(mesh([(a.port, "v1")], router=TO_V1, proxy=roomy)) as engine:
            old = await Client.connect(address(engine))
            await engine.apply(loads_config(mesh([(a.port, "v1")], router=TO_V1, proxy=tight)))
            new = await Client.connect(address(engine))
            assert error_type(await old.call(headers=big)) is None  # keeps its codec
            assert error_type(await new.call(headers=big)) == "OverLimit"
            old.close()
            new.close()
        await a.close()

    run(main())


def test_hammering_reloads_loses_no_request() -> None:
    async def main() -> None:
        a = await Upstream("a").start()
        b = await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v2")]
        configs = [loads_config(mesh(endpoints, router=r)) for r in (TO_V1, TO_V2)]
        async with engine_for(mesh(endpoints, router=TO_V1)) as engine:
            c = await Client.connect(address(engine))
            stop = asyncio.Event()
            answered = asyncio.Event()
            replies: list[str | None] = []

            async def send() -> None:
                while not stop.is_set():
                    window = [c.start() for _ in range(8)]  # pipelined across the swaps
                    for reply in await asyncio.wait_for(asyncio.gather(*window), 5):
                        replies.append(error_type(reply) or reply.attributes.get("server"))
                    answered.set()  # the next window is sent before the next swap

            sender = asyncio.ensure_future(send())
            for i in range(60):
                await engine.apply(configs[i % 2], source="test")
                answered.clear()
                await asyncio.wait_for(answered.wait(), 5)
            stop.set()
            await asyncio.wait_for(sender, 5)
            assert replies and set(replies) <= {"a", "b"}, set(replies)
            assert a.received and b.received
            assert len(a.received) + len(b.received) == len(replies)
            assert engine.stats.get("metaprotocol_reloads_total", source="test", result="ok") == 60
            c.close()
        await a.close()
        await b.close()

    run(main())


def test_the_reloader_survives_a_reload_that_fails_unexpectedly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that raises something unforeseen (here: a control-plane stream that broke
    mid-reload, simulated) is reported and counted; later reloads still happen."""
    from metaprotocol_sdk.cli.proxy import Reloader

    async def main() -> None:
        a = await Upstream("a").start()
        b = await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v2")]
        path = tmp_path / "mesh.yaml"
        path.write_text(mesh(endpoints, router=TO_V2))
        async with engine_for(mesh(endpoints, router=TO_V1)) as engine:
            reloader = Reloader(engine, (str(path),))
            task = asyncio.get_running_loop().create_task(reloader.run())
            real_apply = engine.apply
            calls = 0

            async def broken_once(*args: object, **kwargs: object) -> None:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RuntimeError("stream gone")
                await real_apply(*args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(engine, "apply", broken_once)
            reloader.request("sighup")
            await until(lambda: engine.last_reload is not None, "the failed reload recorded")
            assert engine.last_reload is not None
            assert engine.last_reload.result == "refused"
            assert "RuntimeError: stream gone" in (engine.last_reload.error or "")
            assert not task.done()
            reloader.request("sighup")
            await until(lambda: calls == 2 and engine.last_reload.result == "ok", "reloaded")
            c = await Client.connect(address(engine))
            assert (await c.call()).attributes.get("server") == "b"
            c.close()
            task.cancel()
        await a.close()
        await b.close()

    run(main())


def _many_routes(n: int) -> str:
    """``n`` routes matching one method each, then :data:`TO_V1`'s catch-all."""
    routes = "".join(
        f"- name: r{i}\n  match: {{attributes: {{method: {{exact: m{i}}}}}}}\n"
        f"  route: [{{destination: {{host: svc.test, subset: v{1 + i % 2}}}}}]\n"
        for i in range(n)
    )
    return routes + TO_V1


def test_a_large_reload_is_built_while_requests_are_served() -> None:
    """A reload's runtime (route tables, clusters) is built on the event loop, in slices
    that let it serve between them, and the configuration's hash is taken in a thread: 12 000
    routes took 0.8 s to build and hash, in one piece, and no request was answered
    meanwhile."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a = await Upstream("a").start()
        b = await Upstream("b").start()
        endpoints = [(a.port, "v1"), (b.port, "v2")]
        large = await asyncio.to_thread(loads_config, mesh(endpoints, router=_many_routes(12_000)))
        async with engine_for(mesh(endpoints, router=TO_V1)) as engine:
            c = await Client.connect(address(engine))
            stamps: list[float] = []
            done = asyncio.Event()

            async def call() -> None:
                while not done.is_set():
                    reply = await asyncio.wait_for(c.call(), 10)
                    assert error_type(reply) is None, reply
                    stamps.append(loop.time())

            caller = asyncio.ensure_future(call())
            await until(lambda: len(stamps) > 2, "calls answered")
            # The collector's full passes stall the loop in proportion to all objects alive
            # (the new configuration's among them: 0.2 s here), whatever the engine does; the
            # CLI makes them rare (cli/proxy.py, _tune_gc). Off here, they blur nothing.
            gc.disable()
            try:
                start = loop.time()
                await engine.apply(large)
                end = loop.time()
            finally:
                gc.enable()
            done.set()
            await asyncio.wait_for(caller, 10)
            answered = [t for t in stamps if start < t < end]
            during = [start, *answered, end]
            longest = max(later - earlier for earlier, later in itertools.pairwise(during))
            # In slices, a call waits a few slices (one per loop turn it takes); in one piece,
            # the whole reload, and none is answered meanwhile.
            assert len(answered) >= 5 and longest < (end - start) / 2, (
                f"{len(answered)} replies, none for {longest:.2f} s of the {end - start:.2f} s "
                "reload"
            )
            c.close()
        await a.close()
        await b.close()

    run(main(), timeout=120)


def _one_large_cluster(n: int) -> str:
    endpoints = ", ".join(f"{{address: 10.{i >> 16}.{i >> 8 & 255}.{i & 255}}}" for i in range(n))
    return f"""\
kind: ServiceEntry
metadata: {{name: svc}}
spec: {{hosts: [svc.test], ports: [{{number: 9000, name: tcp-metaprotocol-thrift}}],
        endpoints: [{endpoints}]}}
---
kind: ProxyConfig
metadata: {{name: proxy}}
spec:
  listeners: [{{host: svc.test, port: 9000, bind: '127.0.0.1:0'}}]
"""


def test_a_large_cluster_is_built_while_the_loop_serves() -> None:
    """A cluster's endpoints are made in steps too: one cluster of 100 000 endpoints was made
    in one piece, 0.5 s in which the loop served nothing (2.5 s with the collector's passes)."""

    async def main() -> None:
        large = await asyncio.to_thread(loads_config, _one_large_cluster(40_000))
        engine = Engine(loads_config(_one_large_cluster(10)))
        await engine.start()
        try:
            longest, took = await loop_stood_during(lambda: engine.apply(large))
            # In steps, a few tens of ms at most; in one piece, about 40 % of the reload.
            assert longest < took / 5, f"the loop stood {longest:.2f} s of the {took:.2f} s reload"
        finally:
            await engine.stop(drain=0.1)

    run(main(), timeout=120)
