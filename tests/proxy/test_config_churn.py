"""Red team: a configuration that changes at every reload leaves nothing behind in the
engine's own structures (the stats series have their own tests: test_stats_reload.py)."""

from __future__ import annotations

from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, run

from metaprotocol_sdk.proxy import loads_config


def _config(port: int, timeout_ms: int) -> str:
    router = f"""\
    - name: all
      route: [{{destination: {{host: svc.test}}}}]
      timeout: {timeout_ms}ms
    """
    return mesh([(port, "v1")], router=router)


def test_timeouts_a_reload_changed_keep_no_deadline_queue() -> None:
    """Requests expire through one queue per route timeout value; a queue was kept for good
    once made, so reloads that change a timeout each time (a control plane tuning it at
    every push) grew the queues without end, each walked at every expiry (2 000 reloads:
    2 000 queues, 3 MiB, 32 us per timer fire). Now an emptied queue goes when the timer
    fires."""

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(_config(up.port, 5000)) as engine:
            client = await Client.connect(address(engine))
            for i in range(200):
                await engine.apply(loads_config(_config(up.port, 1000 + i), "test.yaml"))
                assert error_type(await client.call()) is None
            await engine.apply(loads_config(_config(up.port, 50), "test.yaml"))
            # A request that times out: the timer fires, and walks every queue.
            assert error_type(await client.call("hang")) == "Timeout"
            assert len(engine.deadlines._queues) <= 1, len(engine.deadlines._queues)
            client.close()
        await up.close()

    run(main(), timeout=60)
