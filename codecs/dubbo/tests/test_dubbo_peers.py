"""The Dubbo codec against real peers over 127.0.0.1 (no mocks).

Peers: sofa-rpc-node 2.10.0 + dubbo-remoting 2.1.4 (provider and consumer) and dubbo-ssl-python
0.9.6 (consumer). Between consumer and provider runs a loopback relay that uses only our codec
(decode, encode with mutation and rewritten ids, on_error, heartbeat_reply); see
``dubbo_harness.py``. Every test fails (never skips) when a peer is missing.
"""

from __future__ import annotations

import json

from dubbo_harness import LineProcess, Relay, Seen, start_node_consumer
from metaprotocol_dubbo import ERROR_STATUS, DubboCodec, ResultFlag, Status

from metaprotocol_sdk import (
    ErrorType,
    FrameTooLargeError,
    LocalError,
    MessageType,
    Metadata,
    ResponseStatus,
)

INTERFACE = "com.example.DemoService"


def decode(frame: bytes) -> Metadata:
    result = DubboCodec().decode(bytearray(frame))
    assert isinstance(result, Metadata)
    return result


def request_seen(relay: Relay, method: str) -> Seen:
    return relay.wait_for(lambda s: s.direction == "down" and s.metadata.operation_name == method)


def test_node_consumer_request_and_provider_response(
    relay: Relay, node_consumer: LineProcess
) -> None:
    reply = node_consumer.call(method="sayHello", args=["world"])
    assert reply == {"id": reply["id"], "result": "Hello world"}
    request = request_seen(relay, "sayHello").metadata
    assert request.message_type is MessageType.Request
    assert request.attributes["interface"] == INTERFACE
    assert request.attributes["method"] == "sayHello"
    assert request.attributes["version"] == "1.0.0"
    assert request.attributes["group"] == ""
    assert request.values["dubbo_version"] == "5.3.0"
    assert request.values["parameter_types"] == "Ljava/lang/String;"
    response = relay.wait_for(lambda s: s.direction == "up").metadata
    assert response.message_type is MessageType.Response
    assert response.response_status is ResponseStatus.Ok
    assert response.values["result_flag"] == ResultFlag.RESPONSE_VALUE
    # The provider saw our rewritten id; the consumer got its own id back.
    assert response.request_id >= relay.id_base
    (down,) = [data for direction, data in relay.sent if direction == "down"]
    assert decode(down).request_id == request.request_id
    assert not relay.errors


def test_python_consumer_request_metadata(relay: Relay, python_consumer: LineProcess) -> None:
    reply = python_consumer.call(method="sayHello", args=["py"], context={"x-tenant": "t1"})
    assert reply.get("result") == "Hello py", reply
    request = request_seen(relay, "sayHello").metadata
    assert request.message_type is MessageType.Request
    assert request.values["dubbo_version"] == "2.4.10"
    assert request.attributes.to_dict() == {
        "path": INTERFACE,
        "interface": INTERFACE,
        "version": "1.0.0",
        "group": "",
        "x-tenant": "t1",
        "method": "sayHello",
    }
    assert not relay.errors


def _attachments_seen_by_provider(reply: dict[str, object]) -> dict[str, str]:
    assert "result" in reply, reply
    result = reply["result"]
    assert isinstance(result, str)
    seen: dict[str, str] = json.loads(result)
    return seen


def test_node_request_mutation_reaches_the_provider(
    relay: Relay, node_consumer: LineProcess
) -> None:
    relay.request_hook = lambda md: {"x-canary": "yes", "a": "replaced"}
    reply = node_consumer.call(method="attachments", props={"a": "original", "b": "kept"})
    seen = _attachments_seen_by_provider(reply)
    assert seen["x-canary"] == "yes" and seen["a"] == "replaced" and seen["b"] == "kept"
    original = request_seen(relay, "attachments").metadata
    (forwarded,) = [data for direction, data in relay.sent if direction == "up"]
    start = original.codec_state.attachments.start
    assert forwarded[16:start] == original.frame[16:start], "arguments byte-identical"


def test_python_request_mutation_reaches_the_provider(
    relay: Relay, python_consumer: LineProcess
) -> None:
    relay.request_hook = lambda md: {"x-route": "v2", "x-tenant": "rewritten"}
    reply = python_consumer.call(method="attachments", args=[], context={"x-tenant": "t1"})
    seen = _attachments_seen_by_provider(reply)
    assert seen["x-route"] == "v2" and seen["x-tenant"] == "rewritten"
    assert seen["interface"] == INTERFACE


def test_node_consumer_accepts_response_mutation(relay: Relay, node_consumer: LineProcess) -> None:
    relay.response_mutation = {"served-by": "relay"}
    reply = node_consumer.call(method="sayHello", args=["m"])
    assert reply.get("result") == "Hello m", reply
    (down,) = [data for direction, data in relay.sent if direction == "down"]
    md = decode(down)
    assert md.values["result_flag"] == ResultFlag.RESPONSE_VALUE_WITH_ATTACHMENTS
    assert md.attributes["served-by"] == "relay"


def _error_reply(relay: Relay, consumer: LineProcess, error: LocalError) -> dict[str, object]:
    relay.request_hook = lambda md: error
    reply = consumer.call(method="sayHello", args=["x"])
    (sent,) = [data for direction, data in relay.sent if direction == "down"]
    md = decode(sent)
    assert md.message_type is MessageType.Error
    assert md.values["status"] == ERROR_STATUS[error.type]
    assert not [d for d, _ in relay.sent if d == "up"], "nothing forwarded"
    return reply


def test_error_replies_reach_the_node_consumer_as_remote_errors(
    relay: Relay, node_consumer: LineProcess
) -> None:
    for error_type in (ErrorType.RouteNotFound, ErrorType.OverLimit, ErrorType.Timeout):
        relay.reset()
        reply = _error_reply(relay, node_consumer, LocalError(error_type, "local reply"))
        assert reply.get("error") == f"{error_type.name}: local reply", reply
        assert "result" not in reply


def test_error_replies_reach_the_python_consumer_as_remote_errors(
    relay: Relay, python_consumer: LineProcess
) -> None:
    # dubbo-ssl-python 0.9.6 knows statuses 20..90 only (100 makes it time out): see the docs.
    for error_type in (ErrorType.NoHealthyUpstream, ErrorType.ClusterNotFound):
        relay.reset()
        reply = _error_reply(relay, python_consumer, LocalError(error_type, "local reply"))
        assert reply.get("type") == "DubboResponseException", reply
        assert f"{error_type.name}: local reply" in str(reply["error"])


def test_provider_exception_is_an_error_status(
    relay: Relay, node_consumer: LineProcess, python_consumer: LineProcess
) -> None:
    assert node_consumer.call(method="fail", args=["boom"]).get("error") == "boom"
    response = relay.wait_for(lambda s: s.direction == "up").metadata
    assert response.message_type is MessageType.Error
    assert response.values == {"status": Status.SERVER_ERROR, "error_message": "boom"}
    reply = python_consumer.call(method="fail", args=["bang"])
    assert reply.get("type") == "DubboResponseException" and "bang" in str(reply["error"])


def test_exception_result_is_a_response_with_error_status(
    relay: Relay, node_consumer: LineProcess
) -> None:
    reply = node_consumer.call(method="exceptionResult", args=["bad"])
    assert reply.get("name") == "java.lang.Exception", reply
    response = relay.wait_for(lambda s: s.direction == "up").metadata
    assert response.message_type is MessageType.Response
    assert response.response_status is ResponseStatus.Error
    assert response.values["result_flag"] == ResultFlag.RESPONSE_WITH_EXCEPTION


def test_heartbeat_from_dubbo_remoting_answered_by_our_codec(
    relay: Relay, node_consumer: LineProcess
) -> None:
    reply = node_consumer.call(heartbeat=True)
    sent, answer = bytes.fromhex(reply["sent"]), bytes.fromhex(reply["reply"])
    request = decode(sent)
    assert request.message_type is MessageType.Heartbeat
    seen = relay.wait_for(lambda s: s.metadata.message_type is MessageType.Heartbeat)
    assert seen.direction == "down" and seen.metadata.frame == sent
    assert answer == DubboCodec().heartbeat_reply(request)
    assert answer[16:] == b"N"


def test_heartbeat_to_the_provider_and_its_reply(relay: Relay, node_consumer: LineProcess) -> None:
    assert node_consumer.call(method="sayHello", args=["hb"]).get("result") == "Hello hb"
    connection = request_seen(relay, "sayHello").connection
    relay.heartbeat_upstream(connection, request_id=4242)
    reply = relay.wait_for(
        lambda s: s.direction == "up" and s.metadata.message_type is MessageType.Heartbeat
    ).metadata
    assert reply.request_id == 4242 and reply.response_status is ResponseStatus.Ok
    assert reply.frame[16:] == b"N"
    assert DubboCodec().heartbeat_reply(reply) is None


def test_heartbeat_to_the_python_consumer_and_its_reply(
    relay: Relay, python_consumer: LineProcess
) -> None:
    assert python_consumer.call(method="sayHello", args=["hb"]).get("result") == "Hello hb"
    connection = request_seen(relay, "sayHello").connection
    relay.heartbeat_downstream(connection, request_id=4343)
    reply = relay.wait_for(
        lambda s: s.direction == "down" and s.metadata.message_type is MessageType.Heartbeat
    ).metadata
    assert reply.request_id == 4343 and reply.response_status is ResponseStatus.Ok
    assert DubboCodec().heartbeat_reply(reply) is None


def test_direct_heartbeat_between_real_peers(provider: tuple[LineProcess, int]) -> None:
    consumer = start_node_consumer(provider[1])
    try:
        reply = consumer.call(heartbeat=True)
    finally:
        consumer.close()
    request, answer = decode(bytes.fromhex(reply["sent"])), decode(bytes.fromhex(reply["reply"]))
    assert request.message_type is answer.message_type is MessageType.Heartbeat
    assert answer.request_id == request.request_id
    assert DubboCodec().heartbeat_reply(request) == answer.frame


def test_oversized_request_gets_an_error_reply_not_a_stall(
    provider: tuple[LineProcess, int],
) -> None:
    relay = Relay(provider[1], codec_options={"max_frame_size": 1024})
    consumer = start_node_consumer(relay.port)
    try:
        reply = consumer.call(method="sayHello", args=["x" * 5000])
    finally:
        consumer.close()
        relay.close()
    assert "BadRequest: frame of" in str(reply.get("error")), reply
    (error,) = relay.errors
    assert isinstance(error, FrameTooLargeError) and error.limit == 1024
    assert not [d for d, _ in relay.sent if d == "up"], "nothing forwarded"
