"""The timeout queues: expiry order across timeout values, lazy deletion, compaction."""

from __future__ import annotations

import asyncio

from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, run

from metaprotocol_sdk.proxy.deadlines import Deadlines


class Item:
    def __init__(self) -> None:
        self.done = False
        self.deadline = 0.0
        self.queue = None


def test_expiry_and_compaction() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        expired: list[Item] = []
        fired = asyncio.Event()

        def expire(item: Item) -> None:
            expired.append(item)
            fired.set()

        deadlines = Deadlines(loop, expire)
        now = loop.time()
        finished = [Item() for _ in range(1000)]
        for item in finished:
            deadlines.add(item, now, 30.0)
        for item in finished:  # all finish: the queue is compacted, not left to grow
            item.done = True
            deadlines.settle(item)
        queue = next(iter(deadlines._queues.values()))
        assert queue.live == 0 and len(queue.items) <= Deadlines.COMPACT_MIN + 1
        slow, fast = Item(), Item()
        deadlines.add(slow, loop.time(), 0.2)
        deadlines.add(fast, loop.time(), 0.05)  # earlier deadline re-arms the timer
        await asyncio.wait_for(fired.wait(), 5)
        assert expired == [fast]
        fired.clear()
        await asyncio.wait_for(fired.wait(), 5)
        assert expired == [fast, slow]
        deadlines.close()

    run(main())


def test_routes_with_different_timeouts() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        router = """\
        - name: long
          match: {attributes: {kind: {exact: long}}}
          route: [{destination: {host: svc.test}}]
          timeout: 300ms
        - name: short
          route: [{destination: {host: svc.test}}]
          timeout: 50ms
        """
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            order: list[int] = []
            long_f = c.start("hang", {"kind": "long"}, rid=1)
            short_f = c.start("hang", rid=2)
            long_f.add_done_callback(lambda _: order.append(1))
            short_f.add_done_callback(lambda _: order.append(2))
            long_r, short_r = await asyncio.wait_for(asyncio.gather(long_f, short_f), 5)
            assert error_type(long_r) == error_type(short_r) == "Timeout"
            assert order == [2, 1]
            assert engine.stats.total("metaprotocol_requests_total", status="Timeout") == 2
            c.close()
        await up.close()

    run(main())
