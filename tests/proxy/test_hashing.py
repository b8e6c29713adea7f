"""Consistent hashing end to end: Istio's ``consistentHash`` forms (a metadata attribute or the
client's source IP; a ring of ``minimumRingSize`` points or a Maglev table) through the
engine, over real sockets, each client bound to its own loopback address."""

from __future__ import annotations

import json
from dataclasses import dataclass

from proxy_kit import Client, Upstream, address, engine_for, error_type, http_get, mesh, run

from metaprotocol_sdk import Attributes, MessageType, Metadata
from metaprotocol_sdk.proxy import Engine
from metaprotocol_sdk.proxy.balancer import ConsistentHash, Maglev

TO_V1 = """\
- name: all
  route: [{destination: {host: svc.test, subset: v1}}]
"""
CLUSTER = "outbound|9000|v1|svc.test"


@dataclass(eq=False)
class FakeHost:
    key: str
    weight: int = 1
    active: int = 0


@dataclass
class FakeClient:
    ip: str

    def source_ip(self) -> str:
        return self.ip


async def cluster_dump(engine: Engine) -> dict[str, object]:
    assert engine.admin_address is not None
    status, body = await http_get(engine.admin_address, "/config_dump")
    assert status == 200
    (cluster,) = [c for c in json.loads(body)["clusters"] if c["name"] == CLUSTER]
    return dict(cluster)


async def answered_by(c: Client, n: int, **headers: str) -> set[str]:
    """The upstreams that answered ``n`` calls."""
    seen = set()
    for _ in range(n):
        reply = await c.call(headers=headers)
        assert error_type(reply) is None, reply.attributes.to_dict()
        seen.add(reply.attributes["server"])
    return seen


def test_use_source_ip_keeps_each_client_address_on_one_endpoint() -> None:
    """``consistentHash: {useSourceIp: true}`` was refused. Now each client address goes to
    one endpoint, over every connection it opens, where the engine's ring puts it."""

    async def main() -> None:
        ups = [await Upstream(name).start() for name in "abcd"]
        policy = "{loadBalancer: {consistentHash: {useSourceIp: true}}}"
        text = mesh([(u.port, "v1") for u in ups], TO_V1, policy)
        ring = ConsistentHash([FakeHost(f"127.0.0.1:{u.port}") for u in ups], None)
        name_of = {f"127.0.0.1:{u.port}": u.name for u in ups}
        async with engine_for(text) as engine:
            dump = await cluster_dump(engine)
            assert dump["loadBalancer"] == "ConsistentHash"
            assert dump["useSourceIp"] is True
            assert dump["ringHash"] == {"minimumRingSize": 1024}
            where = {}
            for i in range(2, 14):
                ip = f"127.0.0.{i}"
                seen: set[str] = set()
                for _ in range(2):  # two connections from the address
                    c = await Client.connect(address(engine), local_host=ip)
                    seen |= await answered_by(c, 5, user=f"user-{i}")  # not hashed
                    c.close()
                assert len(seen) == 1, (ip, seen)
                where[ip] = seen.pop()
                host = ring.pick(Metadata(MessageType.Request), FakeClient(ip))
                assert host is not None and where[ip] == name_of[host.key]
            assert len(set(where.values())) > 1
        for up in ups:
            await up.close()

    run(main())


def test_maglev_sends_each_key_where_its_table_says() -> None:
    """``consistentHash.maglev`` was refused ("the engine uses a hash ring"); over xDS its
    table size was read and ignored. Now a Maglev table of ``tableSize`` slots."""

    async def main() -> None:
        ups = [await Upstream(name).start() for name in "abc"]
        policy = (
            "{loadBalancer: {consistentHash: {httpHeaderName: user, maglev: {tableSize: 1021}}}}"
        )
        text = mesh([(u.port, "v1") for u in ups], TO_V1, policy)
        table = Maglev([FakeHost(f"127.0.0.1:{u.port}") for u in ups], "user", 1021)
        name_of = {f"127.0.0.1:{u.port}": u.name for u in ups}
        async with engine_for(text) as engine:
            dump = await cluster_dump(engine)
            assert dump["loadBalancer"] == "Maglev"
            assert dump["maglev"] == {"tableSize": 1021} and dump["useSourceIp"] is False
            c = await Client.connect(address(engine))
            seen = set()
            for i in range(60):
                key = f"user-{i}"
                host = table.pick(
                    Metadata(MessageType.Request, attributes=Attributes({"user": key}))
                )
                assert host is not None
                assert await answered_by(c, 2, user=key) == {name_of[host.key]}
                seen.add(name_of[host.key])
            assert seen == {"a", "b", "c"}
            c.close()
        for up in ups:
            await up.close()

    run(main())
