"""Routing: attribute matchers, weighted splits, subsets, load balancers, mutations."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from proxy_kit import (
    ONEWAY,
    PING,
    Client,
    Upstream,
    address,
    build_frame,
    engine_for,
    error_type,
    gather,
    mesh,
    run,
)

from metaprotocol_sdk import MessageType

ROUTES = """\
- name: exact
  match: {attributes: {method: {exact: alpha}}}
  route: [{destination: {host: svc.test, subset: v1}}]
- name: prefix
  match: {attributes: {method: {prefix: beta}}}
  route: [{destination: {host: svc.test, subset: v2}}]
- name: regex
  match: {attributes: {method: {regex: "ga+mma[0-9]"}}}
  route: [{destination: {host: svc.test, subset: v1}}]
- name: present
  match: {attributes: {Flag: {}}}
  route: [{destination: {host: svc.test, subset: v2}}]
- name: two-conditions
  match: {attributes: {method: {exact: both}, tenant: {prefix: acme}}}
  route: [{destination: {host: svc.test, subset: v2}}]
"""


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_attribute_matchers_select_routes(loop: str) -> None:
    async def main() -> None:
        v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
        text = mesh([(v1.port, "v1"), (v2.port, "v2")], router=ROUTES)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))

            async def server_of(method: str, headers: dict[str, str] | None = None) -> str | None:
                reply = await c.call(method, headers)
                return error_type(reply) or reply.attributes["server"]

            assert await server_of("alpha") == "v1"
            assert await server_of("alphabet") == "RouteNotFound"  # exact is exact
            assert await server_of("beta-x") == "v2"
            assert await server_of("gaaamma7") == "v1"
            assert await server_of("xgamma7") == "RouteNotFound"  # regex is a full match
            assert await server_of("other", {"flag": ""}) == "v2"  # present, key case-folded
            assert await server_of("both", {"tenant": "acme-1"}) == "v2"
            assert await server_of("both", {"tenant": "other"}) == "RouteNotFound"
            c.close()
        await v1.close()
        await v2.close()

    run(main(), loop=loop)


def test_weighted_split_is_exact_over_each_window() -> None:
    async def main() -> None:
        v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
        router = """\
        - name: split
          route:
            - {destination: {host: svc.test, subset: v1}, weight: 20}
            - {destination: {host: svc.test, subset: v2}, weight: 80}
        """
        async with engine_for(mesh([(v1.port, "v1"), (v2.port, "v2")], router=router)) as engine:
            c = await Client.connect(address(engine))
            replies = await gather(*(c.start() for _ in range(200)))
            seen = Counter(r.attributes["server"] for r in replies)
            assert seen == {"v1": 40, "v2": 160}
            c.close()
        await v1.close()
        await v2.close()

    run(main())


def test_zero_weight_destination_gets_nothing() -> None:
    async def main() -> None:
        v1, v2 = await Upstream("v1").start(), await Upstream("v2").start()
        router = """\
        - route:
            - {destination: {host: svc.test, subset: v1}, weight: 0}
            - {destination: {host: svc.test, subset: v2}, weight: 100}
        """
        async with engine_for(mesh([(v1.port, "v1"), (v2.port, "v2")], router=router)) as engine:
            c = await Client.connect(address(engine))
            replies = await gather(*(c.start() for _ in range(10)))
            assert {r.attributes["server"] for r in replies} == {"v2"}
            c.close()
        await v1.close()
        await v2.close()

    run(main())


def test_subset_and_round_robin_within_it() -> None:
    async def main() -> None:
        ups = [await Upstream(f"s{i}").start() for i in range(4)]
        eps = [(ups[0].port, "v1"), (ups[1].port, "v2"), (ups[2].port, "v2"), (ups[3].port, "v1")]
        router = "- route: [{destination: {host: svc.test, subset: v2}}]\n"
        async with engine_for(mesh(eps, router=router)) as engine:
            c = await Client.connect(address(engine))
            replies = [await c.call() for _ in range(10)]
            assert Counter(r.attributes["server"] for r in replies) == {"s1": 5, "s2": 5}
            c.close()
        for up in ups:
            await up.close()

    run(main())


def test_consistent_hash_is_sticky_per_attribute() -> None:
    async def main() -> None:
        ups = [await Upstream(f"h{i}").start() for i in range(3)]
        policy = "{loadBalancer: {consistentHash: {httpHeaderName: User}}}"
        text = mesh([(u.port, "v1") for u in ups], traffic_policy=policy)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            owner: dict[str, str] = {}
            for _round in range(3):
                for user in (f"user-{i}" for i in range(30)):
                    server = (await c.call("get", {"user": user})).attributes["server"]
                    assert owner.setdefault(user, server) == server
            assert len(set(owner.values())) >= 2  # keys spread over the hosts
            c.close()
        for up in ups:
            await up.close()

    run(main())


def test_least_request_avoids_busy_host() -> None:
    async def main() -> None:
        busy, idle = await Upstream("busy").start(), await Upstream("idle").start()
        policy = "{loadBalancer: {simple: LEAST_REQUEST}}"
        text = mesh([(busy.port, "v1"), (idle.port, "v1")], traffic_policy=policy)
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            first = c.start("slow")  # whichever host gets it is now busy
            await asyncio.wait_for(
                asyncio.wait(
                    [
                        asyncio.ensure_future(busy.wait_received(1)),
                        asyncio.ensure_future(idle.wait_received(1)),
                    ],
                    return_when=asyncio.FIRST_COMPLETED,
                ),
                5,
            )
            slow_host = "busy" if busy.received else "idle"
            for _ in range(5):
                assert (await c.call()).attributes["server"] != slow_host
            busy.release.set()
            idle.release.set()
            await asyncio.wait_for(first, 5)
            c.close()
        await busy.close()
        await idle.close()

    run(main())


def test_request_and_response_mutation() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        router = """\
        - name: mutate
          route: [{destination: {host: svc.test}}]
          requestMutation: [{key: x-route, value: v2}]
          responseMutation: [{key: x-proxy, value: metaprotocol}]
        """
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            reply = await c.call("get", {"k": "1"}, b"payload", rid=9)
            assert up.received[0].attributes["x-route"] == "v2"  # seen by the server
            assert reply.attributes["req-x-route"] == "v2"
            assert reply.attributes["x-proxy"] == "metaprotocol"  # seen by the client
            assert reply.request_id == 9 and bytes(reply.body) == b"payload"
            c.close()
        await up.close()

    run(main())


def test_oneway_is_forwarded_and_gets_no_reply() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        router = """\
        - route: [{destination: {host: svc.test}}]
          requestMutation: [{key: x-seen, value: "yes"}]
        """
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            c = await Client.connect(address(engine))
            c.send(build_frame(ONEWAY, 5, {"method": "notify"}, b"event"))
            await up.wait_received(1)
            oneway = up.received[0]
            assert oneway.message_type is MessageType.Oneway
            assert oneway.attributes["x-seen"] == "yes" and bytes(oneway.body) == b"event"
            await c.call()  # a later request's reply arrives, and nothing else did
            assert c.unmatched == []
            assert engine.stats.total("metaprotocol_oneway_total", status="Forwarded") == 1
            c.close()
        await up.close()

    run(main())


def test_heartbeats_answered_locally_on_both_sides() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            c = await Client.connect(address(engine))
            pong = c.expect(31)
            c.send(build_frame(PING, 31))
            reply = await asyncio.wait_for(pong, 5)
            assert reply.message_type is MessageType.Heartbeat
            await c.call()  # opens the upstream connection
            up.ping_all()  # the upstream pings the proxy
            await asyncio.wait_for(up.pong.wait(), 5)
            assert up.pongs[0].request_id == 777
            assert up.received[0].operation_name == "get"  # the ping never reached upstream
            assert len(up.received) == 1
            c.close()
        await up.close()

    run(main())


def test_dedicated_pairing_without_id_rewriting() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")], protocol="kvnr", codec="proxy_test_codecs:NoRewriteKVCodec")
        async with engine_for(text) as engine:
            clients = [await Client.connect(address(engine)) for _ in range(4)]
            replies = await gather(
                *(c.start("get", {"who": str(i)}, rid=7) for i, c in enumerate(clients))
            )
            assert [r.attributes["req-who"] for r in replies] == ["0", "1", "2", "3"]
            assert all(r.request_id == 7 for r in replies)
            assert up.accepted == 4  # one upstream connection per downstream connection
            for c in clients:
                c.close()
        await up.close()

    run(main())


def test_route_to_another_service_and_two_listeners() -> None:
    async def main() -> None:
        a, b = await Upstream("a").start(), await Upstream("b").start()
        other = f"""\
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {{name: other}}
        spec:
          hosts: [other.test]
          ports:
            - {{number: 7000, name: http-admin, protocol: HTTP}}
            - {{number: 9100, name: tcp-metaprotocol-kv-other, protocol: TCP, targetPort: {b.port}}}
          endpoints: [{{address: 127.0.0.1}}]
        """
        router = """\
        - name: to-other
          match: {attributes: {service: {exact: other}}}
          route: [{destination: {host: other.test}}]
        - name: local
          route: [{destination: {host: svc.test}}]
        """
        text = mesh([(a.port, "v1")], router=router, extra=other).replace(
            "listeners: [{host: svc.test, port: 9000, bind: '127.0.0.1:0'}]",
            "listeners: [{host: svc.test, port: 9000, bind: '127.0.0.1:0'}, "
            "{host: other.test, port: 9100, bind: '127.0.0.1:0'}]",
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            assert (await c.call("get", {"service": "other"})).attributes["server"] == "b"
            assert (await c.call("get")).attributes["server"] == "a"
            direct = await Client.connect(engine.listener_addresses[("other.test", 9100)])
            assert (await direct.call()).attributes["server"] == "b"  # default route
            c.close()
            direct.close()
        await a.close()
        await b.close()

    run(main())
