"""Red team of ``maxConcurrentStreams`` and the requests waiting for room (see room.py):
hostile clients, upstreams and configurations, over real sockets."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

from proxy_kit import (
    Client,
    Upstream,
    address,
    engine_for,
    error_type,
    mesh,
    run,
    until,
)
from test_concurrent_streams import NO_REWRITE, WAITING, Holding, policy

ROUTER = """\
- name: all
  route: [{destination: {host: svc.test}}]
  timeout: 5s
"""
HANG = """\
- name: slow
  match: {attributes: {method: {exact: hang}}}
  route: [{destination: {host: svc.test}}]
  timeout: 300ms
"""


def test_a_client_s_own_connection_a_timed_out_request_holds_takes_no_later_request() -> None:
    """Streams 1 on a client's own connection whose only request timed out, and a request
    that comes after the timeout: it goes to a fresh connection at once. Before, the
    connection (its one place held by the timed-out request) kept it waiting until its
    route's timeout: only a request already waiting when the other timed out moved."""

    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh(
            [(up.port, "v1")], HANG + ROUTER, policy("maxConcurrentStreams: 1"), **NO_REWRITE
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            assert error_type(await c.call("hang")) == "Timeout"
            later = await asyncio.wait_for(c.start("get"), 5)
            assert error_type(later) is None
            assert up.accepted == 2
            assert engine.stats.total(WAITING) == 0
            c.close()
        await up.close()

    run(main())


def test_requests_that_waited_for_room_let_go_of_their_frames_when_their_client_leaves() -> None:
    """A client sends large requests that wait for room and leaves: their frames are freed
    then, as a finished request's are (``RELEASED``), not kept by the deadline queue until
    their route's timeout, outside the buffer budget (which no longer counts them)."""
    size, count = 256 * 1024, 16

    async def main() -> None:
        up = await Holding("a").start()
        pool = policy("maxConcurrentStreams: 1", "maxConnections: 1")
        async with engine_for(mesh([(up.port, "v1")], ROUTER, pool)) as engine:
            c = await Client.connect(address(engine))
            first = c.start("get", {"n": "0"})
            await up.wait_received(1)
            c.start("get", {"n": "1"})  # waits, ahead of the leaving client's: kept alive
            await until(lambda: engine.stats.total(WAITING) == 1, "one waiting")
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                leaving = await Client.connect(address(engine))
                for _ in range(count):
                    leaving.start("get", body=bytes(size))
                await until(lambda: engine.stats.total(WAITING) == 1 + count, "all waiting")
                leaving.reset()
                await until(lambda: engine.stats.total(WAITING) == 1, "one waiting again")
                del leaving
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert held < size * count / 4, held
            up.answer()
            assert error_type(await asyncio.wait_for(first, 5)) is None
            c.close()
        await up.close()

    run(main())
