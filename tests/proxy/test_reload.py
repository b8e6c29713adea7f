"""Configuration reloads while serving (Engine.apply): routes, clusters, listeners, codecs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from proxy_kit import (
    Client,
    Upstream,
    address,
    engine_for,
    error_type,
    http_get,
    mesh,
    run,
)

from metaprotocol_sdk import ConfigError
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
