"""The timeout queues: expiry order across timeout values, lazy deletion, compaction."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, run, until

from metaprotocol_sdk.proxy.deadlines import COMPACT_MIN, Deadlines


class Item:
    def __init__(self) -> None:
        self.done = False
        self.deadline = 0.0


def queued(deadlines: Deadlines) -> int:
    return sum(len(q.items) for q in deadlines._queues.values())


def collector() -> tuple[list[Item], asyncio.Event, Callable[[Item], None]]:
    """What expired, in order; an event set at each expiry; the callback that records them."""
    expired: list[Item] = []
    fired = asyncio.Event()

    def expire(item: Item) -> None:
        expired.append(item)
        fired.set()

    return expired, fired, expire


def test_finished_items_are_not_kept() -> None:
    """Finished requests (which hold their frames) are dropped, in order or not."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop, lambda item: None)
        now = loop.time()
        # In order: each add drops the finished head, so the queue holds what is in flight.
        for _ in range(1000):
            item = Item()
            deadlines.add(item, now, 30.0)
            assert queued(deadlines) == 1
            item.done = True
        # Out of order: a slow request at the head; the rest finish behind it.
        slow = Item()
        deadlines.add(slow, now, 30.0)
        longest = 0
        for _ in range(10_000):
            item = Item()
            deadlines.add(item, now, 30.0)
            item.done = True
            longest = max(longest, queued(deadlines))
        assert longest <= COMPACT_MIN + 1
        # Many in flight at once: compaction keeps the queue within twice that many.
        live = [Item() for _ in range(500)]
        for i, item in enumerate(live):
            deadlines.add(item, now, 30.0)
            if i % 2:
                item.done = True
        assert queued(deadlines) <= 2 * (250 + 1) + 1
        deadlines.close()

    run(main())


def test_expiry_and_compaction() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        expired, fired, expire = collector()
        deadlines = Deadlines(loop, expire)
        finished = Item()
        deadlines.add(finished, loop.time(), 0.01)
        finished.done = True  # finished in time: never expired
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


def test_deadlines_of_their_own() -> None:
    """Items with deadlines of their own (retries) expire, alongside the queues' items;
    finished ones are dropped, in order or not."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        expired, fired, expire = collector()
        deadlines = Deadlines(loop, expire)
        now = loop.time()
        slow = Item()
        deadlines.add_at(slow, now + 0.15)
        for i in range(10_000):  # finished behind a slow one, with distinct deadlines
            item = Item()
            deadlines.add_at(item, now + 30 + i / 1000)
            item.done = True
        assert len(deadlines._heap) <= 2 * COMPACT_MIN + 1
        late, early, queued_item = Item(), Item(), Item()
        deadlines.add_at(late, now + 0.1)
        deadlines.add_at(early, now + 0.05)
        deadlines.add(queued_item, now, 0.12)
        while len(expired) < 4:
            await asyncio.wait_for(fired.wait(), 5)
            fired.clear()
        # One expiry takes the queues' items before the heap's: sorted, in case a busy machine
        # made two deadlines fall in one.
        assert sorted(expired, key=lambda item: item.deadline) == [early, late, queued_item, slow]
        assert not deadlines._heap
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


def test_finished_requests_behind_a_slow_one_let_go_of_their_frames() -> None:
    """Requests answered behind one that is not yet wait in the timeout queue until it is
    trimmed: they must not keep their frames (up to ``max_frame_size`` each, uncounted) alive
    meanwhile. Mirrored copies alike."""
    router = """\
    - name: mirrored
      route: [{destination: {host: svc.test, subset: v1}}]
      mirror: {host: svc.test, subset: v2}
    """

    async def main() -> None:
        primary, mirror = await Upstream("primary").start(), await Upstream("mirror").start()
        text = mesh([(primary.port, "v1"), (mirror.port, "v2")], router=router)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            slow = c.start("hang")  # holds the head of the queue
            slow.add_done_callback(lambda f: f.exception())  # fails when the client closes
            body = bytes(200_000)
            replies = await asyncio.gather(*(c.start("get", body=body) for _ in range(10)))
            assert all(len(r.body) == len(body) for r in replies)
            # Every copy answered but the slow request's.
            await until(lambda: engine.mirror_sink.inflight == 1, "the copies' replies")
            finished = [p for q in engine.deadlines._queues.values() for p in q.items if p.done]
            assert len(finished) >= 20  # the primaries and their copies, behind the slow one
            assert all(len(p.request.frame) == 0 for p in finished)
            assert not slow.done()
            c.close()
        await primary.close()
        await mirror.close()

    run(main())


def test_retries_do_not_add_a_queue_each() -> None:
    """A retry runs until its route's deadline: a timeout no other request has. Each used to
    get a queue of its own, kept for good and walked at every expiry: a client whose requests
    an upstream fails (or that fails them itself, as the upstream) grew the engine's memory
    and the time of every expiry with each request."""
    router = """\
    - name: flaky
      route: [{destination: {host: svc.test, subset: v1}}]
      retries: {attempts: 2, retryOn: error}
    """

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            for _ in range(5):
                await asyncio.gather(*(c.start("fail") for _ in range(40)))
            assert engine.stats.total("metaprotocol_retries_total", reason="error") == 400
            assert list(engine.deadlines._queues) == [30.0]  # the routes' timeout only
            c.close()
        await up.close()

    run(main(), loop="asyncio")  # its clock is not in whole milliseconds, as uvloop's
