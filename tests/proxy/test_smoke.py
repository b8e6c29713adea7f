from __future__ import annotations

from proxy_kit import Client, Upstream, address, engine_for, mesh, run


def test_basic_request_roundtrip() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("get", {"k": "v"}, b"body", rid=42)
            assert reply.request_id == 42
            assert reply.attributes["server"] == "a"
            assert reply.attributes["req-k"] == "v"
            assert bytes(reply.body) == b"body"
            client.close()
        await up.close()

    run(main())
