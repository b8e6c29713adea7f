"""Many clients over shared upstream connections: ids rewritten, no crossed responses."""

from __future__ import annotations

import pytest
from proxy_kit import Client, Upstream, address, engine_for, gather, mesh, run


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_many_clients_same_ids_never_cross(loop: str) -> None:
    async def main() -> None:
        ups = [await Upstream(f"u{i}").start() for i in range(2)]
        async with engine_for(mesh([(u.port, "v1") for u in ups])) as engine:
            clients = [await Client.connect(address(engine)) for _ in range(20)]
            futures = [
                c.start("get", {"client": str(i)}, f"{i}:{rid}".encode(), rid=rid)
                for rid in range(1, 51)
                for i, c in enumerate(clients)
            ]  # every client uses ids 1..50: they collide on the shared upstream connections
            replies = await gather(*futures)
            for fut_index, reply in enumerate(replies):
                rid, i = divmod(fut_index, 20)
                assert reply.request_id == rid + 1
                assert reply.attributes["req-client"] == str(i)
                assert bytes(reply.body) == f"{i}:{rid + 1}".encode()
            assert [u.accepted for u in ups] == [1, 1]  # shared: one connection per host
            assert sum(len(u.received) for u in ups) == 1000
            assert engine.pending == 0
            for c in clients:
                c.close()
        for up in ups:
            await up.close()

    run(main(), loop=loop)


def test_connections_per_endpoint() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], proxy="upstream: {connectionsPerEndpoint: 3}\n")
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            replies = await gather(*(c.start() for _ in range(30)))
            assert len({r.request_id for r in replies}) == 30
            assert up.accepted == 3
            c.close()
        await up.close()

    run(main())
