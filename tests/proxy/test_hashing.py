"""Consistent hashing end to end: Istio's ``consistentHash`` forms (a metadata attribute or the
client's source IP; a ring of ``minimumRingSize`` points or a Maglev table) through the
engine, over real sockets, each client bound to its own loopback address."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from proxy_kit import (
    Client,
    Upstream,
    address,
    engine_for,
    error_type,
    http_get,
    mesh,
    refusing_port,
    run,
)

from metaprotocol_sdk import Attributes, MessageType, Metadata
from metaprotocol_sdk.proxy import Engine
from metaprotocol_sdk.proxy.balancer import ConsistentHash, Maglev
from metaprotocol_sdk.proxy.upstream import RETRY_HOST_PICKS

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


@pytest.mark.parametrize(
    "algorithm", ["ringHash: {minimumRingSize: 1024}", "maglev: {tableSize: 1021}"]
)
def test_a_retry_of_a_hashed_request_tries_other_endpoints(algorithm: str) -> None:
    """A retry looks for another endpoint than the one that failed (Istio's default retry
    policy: Envoy's ``previous_hosts`` predicate, 5 more picks): a hashing balancer picked
    the same endpoint each time, so every retry of a key whose endpoint was down went to it
    again and failed. Now, as Envoy's ring hash and Maglev do, each further pick moves
    along the ring (the next point) or to another slot of the table (the hash changed)."""
    router = """\
    - name: all
      route: [{destination: {host: svc.test, subset: v1}}]
      retries: {attempts: 2, retryOn: connect-failure}
    """

    async def main() -> None:
        ups = [await Upstream(name).start() for name in "ab"]
        dead = refusing_port()
        ports = [dead] + [u.port for u in ups]
        policy = f"{{loadBalancer: {{consistentHash: {{httpHeaderName: user, {algorithm}}}}}}}"
        text = mesh([(p, "v1") for p in ports], router, policy)
        hosts = [FakeHost(f"127.0.0.1:{p}") for p in ports]
        size = 1021 if "maglev" in algorithm else 1024
        balancer = Maglev(hosts, "user", size) if size == 1021 else ConsistentHash(hosts, "user")

        def owner(key: str, attempt: int = 0) -> str:
            request = Metadata(MessageType.Request, attributes=Attributes({"user": key}))
            host = (
                balancer.pick_again(request, None, attempt) if attempt else balancer.pick(request)
            )
            assert host is not None
            return host.key

        def reaches_another(key: str) -> bool:
            """A retry's picks (RETRY_HOST_PICKS of them, as Envoy's) find a live endpoint:
            for about 1 key in 250 (1/3 ** 5) every pick is the dead one again, by design."""
            return any(
                not owner(key, a).endswith(f":{dead}") for a in range(1, RETRY_HOST_PICKS + 1)
            )

        keys = [
            k
            for k in (f"user-{i}" for i in range(200))
            if owner(k).endswith(f":{dead}") and reaches_another(k)
        ]
        assert len(keys) >= 10
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            for key in keys[:10]:
                reply = await c.call(headers={"user": key})
                assert error_type(reply) is None, (key, reply.attributes.to_dict())
            assert engine.stats.total("metaprotocol_retries_total", reason="connect-failure") >= 10
            c.close()
        for up in ups:
            await up.close()

    run(main())
