"""Real clients -> a loopback relay that decodes and re-encodes with ThriftCodec -> real
servers, and back, for every wire variant (thriftpy2 0.7.1 and Apache thrift 0.25.0)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import thriftpy2.thrift
from thrift.Thrift import TApplicationException as ApAppError

from metaprotocol_sdk import ErrorType, LocalError, MessageType, Metadata, ResponseStatus

sys.path.insert(0, str(Path(__file__).parent))
import thrift_peers as peers
from thrift_peers import apache_fixture, closing_fixture  # noqa: F401 - fixtures

TP_KINDS = [
    "binary-buffered",
    "binary-framed",
    "nonstrict-buffered",
    "nonstrict-framed",
    "compact-buffered",
    "compact-framed",
]
AP_KINDS = ["binary-buffered", "binary-framed", "compact-buffered", "compact-framed"]
DETECTED = {
    "binary-buffered": ("unframed", "binary"),
    "binary-framed": ("framed", "binary"),
    "nonstrict-buffered": ("unframed", "binary"),
    "nonstrict-framed": ("framed", "binary"),
    "compact-buffered": ("unframed", "compact"),
    "compact-framed": ("framed", "compact"),
    "header-binary": ("header", "auto"),
    "header-compact": ("header", "auto"),
}


def make_item(module: Any) -> Any:
    leaf = module.Leaf(small=-3, ratio=0.25, flag=True, blob=b"\x00\xff")
    return module.Item(
        id=2**40,
        name="ünïcode",
        values=[1, -2, 300000],
        tags={"a": "b", "c": ""},
        marks={5, 6},
        leaves=[leaf, module.Leaf(small=1)],
        by_id={1: leaf},
        grid=[["x", "y"], []],
        tiny=-1,
    )


def exercise(client: Any, module: Any, handler: peers.Handler) -> None:
    """Every kind of exchange: calls, a struct round trip, a declared exception, a oneway."""
    assert client.add(2, 3) == 5
    assert client.echo("héllo") == "héllo"
    item = make_item(module)
    back = client.roundtrip(item)
    back.marks = set(back.marks)  # thriftpy2 reads sets as lists
    assert back == item
    with pytest.raises(module.CalcError) as raised:
        client.divide(1, 0)
    assert raised.value.code == 7
    client.notify("event-1")
    assert handler.events.get(timeout=peers.TIMEOUT) == "event-1"
    client.ping()
    assert client.add(40, 2) == 42


def check_seen(relay: peers.Relay, rewritten: bool = False) -> None:
    """The relay decoded what the peers sent: types, names, statuses, ids."""
    by_method: dict[str, list[Metadata]] = {}
    for message in relay.requests:
        by_method.setdefault(message.operation_name, []).append(message)
    assert by_method["add"][0].message_type is MessageType.Request
    assert by_method["add"][0].attributes["method"] == "add"
    assert by_method["notify"][0].message_type is MessageType.Oneway
    replies = {m.operation_name: m for m in relay.responses}
    assert "notify" not in replies  # oneway: no reply
    assert replies["add"].message_type is MessageType.Response
    assert replies["add"].response_status is ResponseStatus.Ok
    assert replies["ping"].response_status is ResponseStatus.Ok
    assert replies["divide"].message_type is MessageType.Response
    assert replies["divide"].response_status is ResponseStatus.Error  # declared exception
    for message in relay.requests + relay.responses:
        assert message.header_size + message.body_size == message.size
        assert message.header_size > 0 and message.body_size > 0
    if rewritten:
        assert all(m.request_id >= 1000 for m in relay.responses)
    assert not relay.errors


def tp_setup(
    kind: str,
    closing: list[Any],
    multiplexed: str | None = None,
    extra_options: dict[str, Any] | None = None,
    **relay_args: Any,
) -> tuple[Any, peers.Handler, peers.Relay]:
    handler = peers.Handler(peers.calc_tp.CalcError)
    server = peers.thriftpy2_server(kind, handler, multiplexed)
    closing.append(server)
    options = {"strict": "false"} if kind.startswith("nonstrict") else {}
    options.update(extra_options or {})
    relay = peers.Relay(server.port, options=options, **relay_args)
    closing.append(relay)
    client = peers.thriftpy2_client(kind, relay.port, multiplexed)
    closing.append(client)
    return client, handler, relay


@pytest.mark.parametrize("kind", TP_KINDS)
def test_thriftpy2_through_relay(kind: str, closing: list[Any]) -> None:
    client, handler, relay = tp_setup(kind, closing)
    exercise(client, peers.calc_tp, handler)
    check_seen(relay)
    assert relay.codecs[0].detected == DETECTED[kind]


@pytest.mark.parametrize("kind", TP_KINDS)
def test_thriftpy2_rewritten_ids_and_skipped_mutation(kind: str, closing: list[Any]) -> None:
    client, handler, relay = tp_setup(
        kind,
        closing,
        rewrite_ids=True,
        mutation={"x-env": "a"},
        extra_options={"mutation_without_headers": "skip"},
    )
    exercise(client, peers.calc_tp, handler)
    check_seen(relay, rewritten=True)
    # No headers in framed/unframed transports: every mutation was refused and counted.
    assert relay.codecs[0].mutations_skipped == len(relay.requests)


@pytest.mark.parametrize("kind", TP_KINDS)
def test_thriftpy2_gets_our_error_reply(kind: str, closing: list[Any]) -> None:
    def reject(message: Metadata) -> LocalError | None:
        if message.operation_name == "echo":
            return LocalError(ErrorType.RouteNotFound, "no route for echo")
        return None

    client, _, relay = tp_setup(kind, closing, reject=reject)
    with pytest.raises(thriftpy2.thrift.TApplicationException) as raised:
        client.echo("x")
    assert raised.value.type == thriftpy2.thrift.TApplicationException.UNKNOWN_METHOD
    assert "RouteNotFound: no route for echo" in raised.value.message
    assert client.add(1, 1) == 2  # the connection stays in sync after a local reply
    assert not relay.errors


def ap_setup(
    apache: peers.Apache,
    client_kind: str,
    server_kind: str,
    closing: list[Any],
    multiplexed: str | None = None,
    **relay_args: Any,
) -> tuple[Any, Any, peers.Handler, peers.Relay]:
    handler = peers.Handler(apache.ttypes.CalcError)
    server = apache.server(server_kind, handler, multiplexed)
    closing.append(server)
    relay = peers.Relay(server.port, **relay_args)
    closing.append(relay)
    client, protocol = apache.client(client_kind, relay.port, multiplexed)
    closing.append(protocol.trans)
    return client, protocol, handler, relay


@pytest.mark.parametrize("kind", AP_KINDS)
def test_apache_through_relay(kind: str, apache: peers.Apache, closing: list[Any]) -> None:
    client, _, handler, relay = ap_setup(apache, kind, kind, closing, rewrite_ids=True)
    exercise(client, apache.ttypes, handler)
    check_seen(relay, rewritten=True)
    assert relay.codecs[0].detected == DETECTED[kind]


@pytest.mark.parametrize("kind", [*AP_KINDS, "header-binary", "header-compact"])
def test_apache_gets_our_error_reply(kind: str, apache: peers.Apache, closing: list[Any]) -> None:
    def reject(message: Metadata) -> LocalError | None:
        if message.operation_name == "echo":
            return LocalError(ErrorType.OverLimit, "")
        return None

    server_kind = "header-any" if kind.startswith("header") else kind
    client, _, _, relay = ap_setup(apache, kind, server_kind, closing, reject=reject)
    with pytest.raises(ApAppError) as raised:
        client.echo("x")
    assert raised.value.type == ApAppError.INTERNAL_ERROR
    assert "OverLimit" in str(raised.value.message)
    assert client.add(1, 1) == 2
    assert not relay.errors


@pytest.mark.parametrize("kind", ["header-binary", "header-compact"])
def test_theader_mutation_reaches_server(
    kind: str, apache: peers.Apache, closing: list[Any]
) -> None:
    client, protocol, handler, relay = ap_setup(
        apache,
        kind,
        "header-any",
        closing,
        options={"transport": "header"},
        mutation={"x-route": "blue", "Trace": "replaced"},
        response_mutation={"x-served-by": "relay"},
        rewrite_ids=True,
    )
    protocol.set_header(b"trace", b"original")
    protocol.set_header(b"user", b"u1")
    assert client.add(2, 3) == 5
    seen = handler.seen_headers
    # The server read the client's headers with the mutation applied.
    assert seen[0] == {b"Trace": b"replaced", b"user": b"u1", b"x-route": b"blue"}
    # The relay saw the client's own headers as attributes.
    first = relay.requests[0]
    assert first.attributes.to_dict() == {"trace": "original", "user": "u1", "method": "add"}
    # The response carried the response mutation back to the client.
    assert protocol.get_headers().get(b"x-served-by") == b"relay"
    exercise(client, apache.ttypes, handler)
    check_seen(relay, rewritten=True)
    assert all(h.get(b"x-route") == b"blue" for h in seen)
    assert relay.codecs[0].mutations_skipped == 0


@pytest.mark.parametrize("kind", ["binary-framed", "binary-buffered", "compact-buffered"])
def test_thriftpy2_client_to_apache_theader_server(
    kind: str, apache: peers.Apache, closing: list[Any]
) -> None:
    handler = peers.Handler(apache.ttypes.CalcError)
    server = apache.server("header-any", handler)
    closing.append(server)
    relay = peers.Relay(server.port)
    closing.append(relay)
    client = peers.thriftpy2_client(kind, relay.port)
    closing.append(client)
    exercise(client, peers.calc_tp, handler)
    check_seen(relay)


def test_apache_multiplexed(apache: peers.Apache, closing: list[Any]) -> None:
    client, _, handler, relay = ap_setup(
        apache, "binary-framed", "binary-framed", closing, multiplexed="calc"
    )
    exercise(client, apache.ttypes, handler)
    check_seen(relay)
    first = relay.requests[0]
    assert first.attributes.to_dict() == {"service": "calc", "method": "add"}
    assert first.operation_name == "add"


def test_thriftpy2_multiplexed_error_reply(closing: list[Any]) -> None:
    def reject(message: Metadata) -> LocalError | None:
        if message.attributes.get("service") == "calc" and message.operation_name == "echo":
            return LocalError(ErrorType.NoHealthyUpstream, "")
        return None

    client, _, relay = tp_setup("compact-framed", closing, "calc", reject=reject)
    with pytest.raises(thriftpy2.thrift.TApplicationException):
        client.echo("x")
    exercise_no_echo = client.add(1, 2)
    assert exercise_no_echo == 3
    assert relay.requests[0].attributes["service"] == "calc"


def test_theader_zlib_client_through_relay(apache: peers.Apache, closing: list[Any]) -> None:
    from thrift.transport.THeaderTransport import THeaderTransformID

    client, protocol, handler, relay = ap_setup(
        apache, "header-binary", "header-any", closing, mutation={"x-route": "z"}, rewrite_ids=True
    )
    protocol.add_transform(THeaderTransformID.ZLIB)
    protocol.set_header(b"user", b"u1")
    assert client.echo("compressed " * 50) == "compressed " * 50
    assert handler.seen_headers[0] == {b"user": b"u1", b"x-route": b"z"}
    assert relay.requests[0].codec_state.header.transform_count == 1
    assert relay.requests[0].attributes["user"] == "u1"
    exercise(client, apache.ttypes, handler)
    check_seen(relay, rewritten=True)
