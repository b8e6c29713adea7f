"""Aeraki's ``globalRateLimit`` over real sockets: KV and Thrift clients, a KV upstream, the
engine, and a Rate Limit Service on grpcio counting in a real ``redis-server`` (``rls_kit``).

Waits poll conditions with a bound; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from peer_check import missing
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
    until,
)
from rls_kit import GarbageService, Redis, rate_limit_service

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy import Engine, loads_config

RLS = "outbound|8081||rls.test"


@pytest.fixture(scope="session")
def redis() -> Iterator[Redis]:
    if shutil.which("redis-server") is None:
        missing("redis-server", "./dev installs Debian's redis-server")
    server = Redis()
    yield server
    server.stop()


def config(
    up: int,
    rls_port: int,
    domain: str,
    *,
    deny: bool = False,
    timeout: str = "2s",
    descriptors: str = "[{property: method, descriptorKey: method}]",
    proxy: str = "",
    protocol: str = "kv",
    codec: str = "metaprotocol_sdk.examples.kv:KVCodec",
) -> str:
    """One service behind the engine, its MetaRouter with ``globalRateLimit`` on requests
    whose method starts with ``g``, and the RLS as a ServiceEntry (``rls.test:8081``)."""
    limit = (
        f"{{domain: {domain}, rateLimitService: '{RLS}', requestTimeout: {timeout},"
        f" denyOnFail: {str(deny).lower()}, match: {{attributes: {{method: {{prefix: g}}}}}},"
        f" descriptors: {descriptors}}}"
    )
    rls = f"""\
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {{name: rls}}
        spec:
          hosts: [rls.test]
          ports: [{{number: 8081, name: grpc-rls, protocol: GRPC}}]
          endpoints: [{{address: 127.0.0.1, ports: {{grpc-rls: {rls_port}}}}}]
        """
    text = mesh(
        [(up, "v1")],
        router="- name: all\n  route: [{destination: {host: svc.test, subset: v1}}]\n",
        proxy=proxy,
        extra=rls,
        protocol=protocol,
        codec=codec,
    )
    return text.replace("  routes:\n", f"  globalRateLimit: {limit}\n  routes:\n", 1)


def results(engine: Engine, name: str = "metaprotocol_global_ratelimit_total") -> dict[str, int]:
    """The non-zero series of ``name`` by their last label's value."""
    out = {}
    for key, value in engine.stats_snapshot().items():
        if key.startswith(name + "{") and value:
            out[key.rsplit("=", 1)[1].strip('"}')] = int(value)
    return out


def entries(request: Any) -> list[list[tuple[str, str]]]:
    """The descriptors of a ``RateLimitRequest`` as lists of ``(key, value)``."""
    return [[(e.key, e.value) for e in d.entries] for d in request.descriptors]


def calls_active(engine: Engine) -> float:
    return engine.stats_snapshot()["metaprotocol_global_ratelimit_calls_active"]


def test_under_the_limit_pass_over_it_overlimit_with_the_request_id(redis: Redis) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        with rate_limit_service(redis, {("method", "get"): 3}) as rls:
            async with engine_for(config(up.port, rls.port, "kv-basic")) as engine:
                client = await Client.connect(address(engine))
                replies = [await client.call("get", rid=100 + i) for i in range(6)]
                assert [error_type(r) for r in replies] == [None] * 3 + ["OverLimit"] * 3
                assert [r.request_id for r in replies] == list(range(100, 106))
                assert all(r.attributes.get("server") == "up" for r in replies[:3])
                message = replies[3].attributes.get("error-message") or ""
                assert "rate limit service" in message, replies[3].attributes.to_dict()
                assert len(up.received) == 3  # the limited ones never left the engine
                # Not matching `match` (method not starting with g): no call, not limited.
                assert error_type(await client.call("put")) is None
                assert rls.calls == 6
                sent = rls.requests[0]
                assert sent.domain == "kv-basic" and sent.hits_addend == 1
                assert [(e.key, e.value) for e in sent.descriptors[0].entries] == [
                    ("method", "get")
                ]
                assert results(engine) == {"ok": 3, "over_limit": 3}
                _, text = await http_get(engine.admin_address, "/stats")  # type: ignore[arg-type]
                assert "# HELP metaprotocol_global_ratelimit_total Requests checked" in text
                assert 'result="over_limit"} 3' in text
                dump = engine.config_dump()
                listener = dump["listeners"][0]
                assert listener["globalRateLimit"]["service"] == RLS
                assert listener["routes"][0]["chain"] == ["global_rate_limit"]
                assert dump["settings"]["limits"]["max_rate_limit_calls"] == 1000
                client.close()
        await up.close()

    run(main())


def test_descriptors_one_per_property_a_missing_one_is_skipped(redis: Redis) -> None:
    both = (
        "[{property: method, descriptorKey: m},"
        " {property: User, descriptorKey: user}]"  # attribute names are case-insensitive
    )

    async def main() -> None:
        up = await Upstream("up").start()
        with rate_limit_service(redis, {("user", "alice"): 1}) as rls:
            text = config(up.port, rls.port, "kv-desc", descriptors=both)
            async with engine_for(text) as engine:
                client = await Client.connect(address(engine))
                assert error_type(await client.call("get", {"user": "alice"})) is None
                assert error_type(await client.call("get", {"user": "alice"})) == "OverLimit"
                assert error_type(await client.call("get", {"user": "bob"})) is None
                entries = [
                    [(e.key, e.value) for e in d.entries] for d in rls.requests[0].descriptors
                ]
                assert entries == [[("m", "get")], [("user", "alice")]]
                assert error_type(await client.call("get")) is None  # no user: only m is sent
                assert [
                    (e.key, e.value) for d in rls.requests[3].descriptors for e in d.entries
                ] == [("m", "get")]
                client.close()
            only_user = "[{property: user, descriptorKey: user}]"
            async with engine_for(
                config(up.port, rls.port, "kv-desc2", descriptors=only_user)
            ) as engine:
                client = await Client.connect(address(engine))
                calls = rls.calls
                assert error_type(await client.call("get")) is None  # nothing to ask: goes on
                assert rls.calls == calls and results(engine) == {"skipped": 1}
                client.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("deny", [True, False])
def test_rate_limit_service_down(deny: bool) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        async with engine_for(config(up.port, refusing_port(), "down", deny=deny)) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("get", rid=7)
            assert reply.request_id == 7
            if deny:
                assert error_type(reply) == "OverLimit"
                assert "rate limit service failed (unavailable)" in (
                    reply.attributes.get("error-message") or ""
                )
                assert results(engine) == {"failure_denied": 1}
            else:
                assert reply.attributes.get("server") == "up"
                assert results(engine) == {"failure_allowed": 1}
            failures = results(engine, "metaprotocol_global_ratelimit_failures_total")
            assert failures == {"unavailable": 1}
            client.close()
        await up.close()

    run(main())


@pytest.mark.parametrize("deny", [True, False])
def test_a_service_that_never_answers_gets_request_timeout(redis: Redis, deny: bool) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        with rate_limit_service(redis, {}) as rls:
            rls.mode = "hang"
            text = config(up.port, rls.port, "hang", deny=deny, timeout="300ms")
            async with engine_for(text) as engine:
                client = await Client.connect(address(engine))
                started = asyncio.get_running_loop().time()
                reply = await client.call("get", rid=9)
                elapsed = asyncio.get_running_loop().time() - started
                assert 0.25 < elapsed < 3.0, elapsed
                assert reply.request_id == 9
                assert error_type(reply) == ("OverLimit" if deny else None)
                if deny:
                    assert "failed (timeout)" in (reply.attributes.get("error-message") or "")
                failures = results(engine, "metaprotocol_global_ratelimit_failures_total")
                assert failures == {"timeout": 1}
                await until(lambda: rls.cancelled == 1, "the service to see the deadline")
                assert calls_active(engine) == 0
                client.close()
        await up.close()

    run(main())


def test_outstanding_calls_are_capped_and_a_leaving_client_cancels_its_calls(
    redis: Redis,
) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        with rate_limit_service(redis, {}) as rls:
            rls.mode = "hang"
            text = config(
                up.port,
                rls.port,
                "cap",
                timeout="20s",
                proxy="limits: {maxRateLimitCalls: 2}\ntimeouts: {route: 30s}\n",
            )
            async with engine_for(text) as engine:
                held = await Client.connect(address(engine))
                waiting = [held.start("get") for _ in range(2)]
                await until(lambda: rls.calls == 2, "two calls at the service")
                assert calls_active(engine) == 2 and engine.pending == 2
                # Over the cap: no call, the failure policy at once (here: allow).
                other = await Client.connect(address(engine))
                replies = [await other.call("get") for _ in range(3)]
                assert all(r.attributes.get("server") == "up" for r in replies)
                assert rls.calls == 2
                failures = results(engine, "metaprotocol_global_ratelimit_failures_total")
                assert failures == {"overflow": 3}
                # The client of the held requests leaves: its calls are cancelled at once
                # (not at requestTimeout), and nothing of them stays.
                held.reset()
                await until(lambda: rls.cancelled == 2, "the service to see both cancelled")
                await until(lambda: engine.pending == 0, "the held requests released")
                assert calls_active(engine) == 0 and engine.buffered >= 0
                assert results(engine)["cancelled"] == 2
                assert not any(w.done() and not w.exception() for w in waiting)
                # The cap is free again.
                rls.mode = "count"
                assert (await other.call("get")).attributes.get("server") == "up"
                assert rls.calls == 3
                other.close()
        await up.close()

    run(main())


def test_huge_or_malformed_replies_fail_the_call_not_the_engine(redis: Redis) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        with rate_limit_service(redis, {}) as rls:
            for mode in ("huge", "error"):
                rls.mode = mode
                text = config(up.port, rls.port, mode, deny=True)
                async with engine_for(text) as engine:
                    client = await Client.connect(address(engine))
                    reply = await client.call("get", rid=5)
                    assert error_type(reply) == "OverLimit" and reply.request_id == 5
                    assert "failed (error)" in (reply.attributes.get("error-message") or "")
                    assert error_type(await client.call("put")) is None  # still serving
                    client.close()
        garbage = GarbageService()
        try:
            async with engine_for(config(up.port, garbage.port, "garbage")) as engine:
                client = await Client.connect(address(engine))
                assert (await client.call("get")).attributes.get("server") == "up"
                assert results(engine, "metaprotocol_global_ratelimit_failures_total") == {
                    "error": 1
                }
                client.close()
        finally:
            garbage.stop()
        await up.close()

    run(main())


def test_reload_keeps_an_unchanged_channel_and_closes_a_dropped_one(redis: Redis) -> None:
    async def main() -> None:
        up = await Upstream("up").start()
        with (
            rate_limit_service(redis, {("method", "get"): 100}) as first,
            rate_limit_service(redis, {("method", "get"): 100}) as second,
        ):
            async with engine_for(config(up.port, first.port, "reload")) as engine:
                client = await Client.connect(address(engine))
                assert error_type(await client.call("get")) is None
                old = engine.rate_limit_services[RLS]
                await engine.apply(loads_config(config(up.port, first.port, "reload2")))
                assert engine.rate_limit_services[RLS] is old  # same endpoints: same channel
                assert error_type(await client.call("get")) is None
                await engine.apply(loads_config(config(up.port, second.port, "reload2")))
                assert engine.rate_limit_services[RLS] is not old
                await until(lambda: old._channel is None, "the dropped channel to close")
                assert error_type(await client.call("get")) is None
                assert (first.calls, second.calls) == (2, 1)
                client.close()
        await up.close()

    run(main())


def thrift_call(port: int, seqid: int) -> tuple[int, str]:
    """A framed binary ``ping`` with ``seqid`` on a raw socket: the reply's seqid, and its
    application exception message ('' for a normal reply), read with the Thrift codec."""
    from metaprotocol_thrift import ThriftCodec
    from thriftpy2.protocol import TBinaryProtocol
    from thriftpy2.thrift import TMessageType
    from thriftpy2.transport import TMemoryBuffer

    from metaprotocol_sdk import Metadata
    from metaprotocol_sdk.demo.idl import hello

    buf = TMemoryBuffer()
    proto = TBinaryProtocol(buf)
    proto.write_message_begin("ping", TMessageType.CALL, seqid)
    hello().Hello.ping_args().write(proto)
    proto.write_message_end()
    payload = buf.getvalue()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("!i", len(payload)) + payload)
        data = bytearray()
        codec = ThriftCodec()
        while True:
            chunk = sock.recv(65536)
            assert chunk, "closed before a reply"
            data += chunk
            message = codec.decode(bytearray(data))
            if isinstance(message, Metadata):
                break
    text = bytes(data).decode("latin-1")
    return message.request_id, ("OverLimit" if "OverLimit" in text else "")


def test_thrift_over_the_limit_is_an_application_exception_with_the_seqid(redis: Redis) -> None:
    from metaprotocol_sdk.demo.thrift_server import HelloServer

    server = HelloServer("v1").start()

    async def main() -> None:
        with rate_limit_service(redis, {("method", "ping"): 2}) as rls:
            text = config(
                server.port,
                rls.port,
                "thrift",
                protocol="thrift",
                codec="aeraki.meta_protocol.codec.thrift",
            ).replace("{method: {prefix: g}}", "{method: {exact: ping}}")
            async with engine_for(text) as engine:
                port = address(engine)[1]
                got = [await asyncio.to_thread(thrift_call, port, 40 + i) for i in range(4)]
                assert got == [(40, ""), (41, ""), (42, "OverLimit"), (43, "OverLimit")]
                assert results(engine) == {"ok": 2, "over_limit": 2}

    try:
        run(main())
    finally:
        server.close()


def test_the_limit_is_global_across_two_worker_processes(redis: Redis, tmp_path: Path) -> None:
    """With a local limit of 10, two workers would let 20 through: here exactly 10 pass."""
    from test_workers import CONNECTIONS, Supervisor, total

    async def main() -> None:
        up = await Upstream("up").start()
        with rate_limit_service(redis, {("method", "get"): 10}) as rls:
            sup = Supervisor(tmp_path, config(up.port, rls.port, "workers"))
            try:

                async def one() -> str | None:
                    client = await Client.connect(sup.address)
                    try:
                        return error_type(await client.call("get"))
                    finally:
                        client.close()

                outcomes = await asyncio.gather(*(one() for _ in range(CONNECTIONS)))
                assert outcomes.count(None) == 10
                assert outcomes.count("OverLimit") == CONNECTIONS - 10
                checked = []
                for worker in await sup.workers():
                    stats = await sup.worker_stats(worker)
                    checked.append(total(stats, "metaprotocol_global_ratelimit_total"))
                assert len(checked) == 2 and all(n > 0 for n in checked), checked
                assert sum(checked) == CONNECTIONS
            finally:
                code, err = sup.stop()
                assert code == 0, err
        await up.close()

    run(main(), timeout=60)


def test_config_errors_name_the_field() -> None:
    good = config(1234, 4321, "d")

    def refused(old: str, new: str) -> ConfigError:
        assert old in good, old
        with pytest.raises(ConfigError) as info:
            loads_config(good.replace(old, new, 1))
        return info.value

    cases = [
        ("domain: d,", "domain: d, burst: 3,", "spec.globalRateLimit.burst", "unknown field"),
        ("requestTimeout: 2s", "requestTimeout: 2 seconds", ".requestTimeout", "duration"),
        ("requestTimeout: 2s", "requestTimeout: 0s", ".requestTimeout", "positive"),
        ("denyOnFail: false", "denyOnFail: 'no'", ".denyOnFail", "true or false"),
        (f"'{RLS}'", "'rls.test:8081'", ".rateLimitService", "outbound|<port>"),
        (f"'{RLS}'", "'outbound|8081||nope.test'", ".rateLimitService", "no ServiceEntry"),
        (f"'{RLS}'", "'outbound|8082||rls.test'", ".rateLimitService", "has no port 8082"),
        (f"'{RLS}'", "'outbound|8081|v9|rls.test'", ".rateLimitService", "unknown subset"),
        (
            "descriptors: [{property: method, descriptorKey: method}]",
            "descriptors: []",
            ".descriptors",
            "must not be empty",
        ),
        (
            "descriptorKey: method",
            "key: method",
            ".descriptors[0].key",
            "unknown field",
        ),
        ("domain: d,", "", ".domain", "required"),
        (
            "match: {attributes: {method: {prefix: g}}}",
            "match: {attributes: {method: {regex: '('}}}",
            ".match.attributes.method.regex",
            "invalid regular expression",
        ),
    ]
    for old, new, field, words in cases:
        error = refused(old, new)
        assert error.field is not None and error.field.endswith(field), (new, error)
        assert words in error.reason, (new, error)
    # An RLS with several endpoints takes IP addresses only (one name alone is fine).
    error = refused(
        "endpoints: [{address: 127.0.0.1,",
        "endpoints: [{address: rls-a.test, ports: {grpc-rls: 1}}, {address: 127.0.0.1,",
    )
    assert "is a name" in error.reason
    # On a route, as Aeraki: refused, pointing to spec level.
    with pytest.raises(ConfigError) as info:
        loads_config(
            good.replace("  - name: all\n", "  - name: all\n      globalRateLimit: {domain: d}\n")
        )
    assert info.value.field == "spec.routes[0].globalRateLimit"
    assert "spec level" in info.value.reason


def test_refused_with_a_clear_message_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)  # as if grpcio were not installed
    with pytest.raises(ConfigError) as info:
        loads_config(config(1234, 4321, "d"))
    assert info.value.field == "spec.globalRateLimit"
    assert "pip install 'metaprotocol-sdk[ratelimit]'" in info.value.reason


def test_config_dump_json_round_trips(redis: Redis) -> None:
    async def main() -> None:
        async with engine_for(config(1, 4321, "dump")) as engine:
            listener = json.loads(json.dumps(engine.config_dump()))["listeners"][0]
            limit: dict[str, Any] = listener["globalRateLimit"]
            assert limit["endpoints"] == [["127.0.0.1", 4321]]
            assert limit["request_timeout"] == 2.0 and limit["deny_on_fail"] is False

    run(main())


class DubboServer(asyncio.Protocol):
    """A Dubbo provider answering every request ``"ok"`` with its id."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        from metaprotocol_dubbo.frames import build_response

        self.buffer += data
        while len(self.buffer) >= 16:
            size = 16 + struct.unpack_from("!I", self.buffer, 12)[0]
            if len(self.buffer) < size:
                return
            (rid,) = struct.unpack_from("!q", self.buffer, 4)
            del self.buffer[:size]
            self.transport.write(build_response("ok", request_id=rid))


async def dubbo_call(port: int, rid: int, attachments: dict[str, str]) -> tuple[int, int, bytes]:
    """One Dubbo request: the reply's id, status and body."""
    from metaprotocol_dubbo.frames import build_request

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        frame = build_request(
            "org.x.Greeter", "greet", ["a"], request_id=rid, attachments=attachments
        )
        writer.write(frame)
        head = await asyncio.wait_for(reader.readexactly(16), 5)
        body = await asyncio.wait_for(reader.readexactly(struct.unpack_from("!I", head, 12)[0]), 5)
    finally:
        writer.close()
    return struct.unpack_from("!q", head, 4)[0], head[3], body


@pytest.mark.parametrize("deny", [True, False])
def test_a_value_grpc_cannot_send_is_a_failed_call(redis: Redis, deny: bool) -> None:
    """A Java string may hold a lone surrogate (the Dubbo codec keeps it): a descriptor value
    protobuf cannot encode as UTF-8 fails the call (``error``, ``denyOnFail`` applies); it
    used to escape the filter's task, answered "a filter's wait failed" and counted nothing."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(DubboServer, "127.0.0.1", 0)
        up = server.sockets[0].getsockname()[1]
        with rate_limit_service(redis, {}) as rls:
            text = config(
                up,
                rls.port,
                "surrogate",
                deny=deny,
                descriptors="[{property: user, descriptorKey: user}]",
                protocol="dubbo",
                codec="aeraki.meta_protocol.codec.dubbo",
            )
            async with engine_for(text) as engine:
                port = address(engine)[1]
                rid, status, body = await dubbo_call(port, 31, {"user": "x\ud800y"})
                assert rid == 31
                if deny:
                    assert b"OverLimit: the rate limit service failed (error)" in body, body
                    assert results(engine) == {"failure_denied": 1}
                else:
                    assert (status, body) == (20, b"\x91\x02ok"), body
                    assert results(engine) == {"failure_allowed": 1}
                failures = results(engine, "metaprotocol_global_ratelimit_failures_total")
                assert failures == {"error": 1} and rls.calls == 0
                assert calls_active(engine) == 0
                # A value it can send is asked as usual.
                rid, status, body = await dubbo_call(port, 32, {"user": "alice"})
                assert (rid, status, body) == (32, 20, b"\x91\x02ok") and rls.calls == 1
        server.close()
        await server.wait_closed()

    run(main())


def test_the_access_log_flags_a_limited_request_rl_and_one_refused_on_a_failure_rlse(
    redis: Redis, tmp_path: Path
) -> None:
    # Envoy's flags: RL for OVER_LIMIT, RLSE for a refusal because the service failed
    # (denyOnFail); a request let through after a failure gets none, as in Envoy.
    log = tmp_path / "access.log"
    proxy = f"accessLog: {{path: '{log}'}}\ntelemetry: {{istioMetrics: true}}\n"
    flags: dict[str, dict[str, float]] = {}

    def istio_flags(engine: Engine) -> dict[str, float]:
        return {
            key.split('response_flags="', 1)[1].split('"', 1)[0]: value
            for key, value in engine.stats_snapshot().items()
            if key.startswith("istio_requests_total{") and value
        }

    async def main() -> None:
        up = await Upstream("up").start()
        with rate_limit_service(redis, {("method", "get"): 1}) as rls:
            async with engine_for(config(up.port, rls.port, "kv-log", proxy=proxy)) as engine:
                client = await Client.connect(address(engine))
                assert error_type(await client.call("get", rid=1)) is None
                assert error_type(await client.call("get", rid=2)) == "OverLimit"
                flags["limited"] = istio_flags(engine)
                client.close()
        for deny, rid in ((True, 3), (False, 4)):
            text = config(up.port, refusing_port(), f"down-{rid}", deny=deny, proxy=proxy)
            async with engine_for(text) as engine:
                client = await Client.connect(address(engine))
                reply = await client.call("get", rid=rid)
                assert error_type(reply) == ("OverLimit" if deny else None)
                flags[f"deny={deny}"] = istio_flags(engine)
                client.close()
        await up.close()

    run(main())
    records = {r["request_id"]: r for r in map(json.loads, log.read_text().splitlines())}
    assert {rid: (r["status"], r["response_flags"]) for rid, r in records.items()} == {
        1: ("Ok", "-"),
        2: ("OverLimit", "RL"),
        3: ("OverLimit", "RLSE"),
        4: ("Ok", "-"),
    }
    # Istio's response_flags label says the same.
    assert flags == {"limited": {"-": 1, "RL": 1}, "deny=True": {"RLSE": 1}, "deny=False": {"-": 1}}
