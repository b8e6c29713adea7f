"""FilterHarness runs filters as the engine's chain does: order, local replies, holds,
response attributes only on request, errors raised or answered."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Awaitable
from typing import ClassVar

import pytest

from metaprotocol_sdk import Attributes, ErrorType, ResponseStatus
from metaprotocol_sdk.examples.audit_filter import AuditFilter
from metaprotocol_sdk.filters import Filter, RequestContext, ResponseContext
from metaprotocol_sdk.testing import FilterHarness


class Tag(Filter):
    """Adds ``tag-<label>: <label>``; records the order it was called in."""

    name = "tag"
    calls: ClassVar[list[str]] = []

    def __init__(self, *, label: str = "a") -> None:
        self.label = label

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        Tag.calls.append(self.label)
        context.add_mutation(f"tag-{self.label}", self.label)
        return None


class Deny(Filter):
    name = "deny"

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        context.local_reply(ErrorType.OverLimit)  # no message: the engine uses the name
        return None


class HoldOnFuture(Filter):
    """Holds every request on a future of the running loop (the test completes it)."""

    name = "hold"

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        return asyncio.get_running_loop().create_future()


class HoldOnCoroutine(Filter):
    name = "hold-coroutine"

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def _wait(self) -> None:
        await self.gate.wait()

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        return self._wait()


class Explode(Filter):
    name = "explode"

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        raise RuntimeError("boom")


class SeeReplies(Filter):
    """Records the attributes it is shown."""

    name = "see"
    seen: list[Attributes | None]

    def __init__(self) -> None:
        self.seen = []

    def on_response(self, context: ResponseContext) -> None:
        self.seen.append(context.attributes)


class ReadReplies(SeeReplies):
    response_attributes = True


def test_example_filter_marks_refuses_and_counts() -> None:
    audit = AuditFilter.from_config({"auditor": "ci", "required": ["method"]})
    with FilterHarness(audit) as harness:
        ok = harness.request({"Method": "sayHello"})  # attribute keys are case-insensitive
        assert ok.continued and ok.mutation == {"x-audited-by": "ci"}
        refused = harness.request({"interface": "Greeter"})
        assert refused.replied and refused.error is ErrorType.BadRequest
        assert refused.message == "missing attribute 'method'" and refused.filter is audit
        assert refused.mutation == {}
        harness.response(ResponseStatus.Ok, request=ok)
        harness.response(ResponseStatus.Error, local_error=ErrorType.BadRequest, request=refused)
        harness.response(ResponseStatus.Error)
    assert audit.answers == {"Ok": 1, "BadRequest": 1, "Error": 1}


def test_chain_runs_in_order_and_stops_at_a_local_reply() -> None:
    Tag.calls = []
    harness = FilterHarness(Tag(label="a"), Tag(label="b"), Deny(), Tag(label="c"))
    outcome = harness.request({"method": "m"}, route="r1", listener="h:1")
    assert Tag.calls == ["a", "b"]  # c never ran
    assert outcome.replied and outcome.error is ErrorType.OverLimit
    assert outcome.message == "deny"  # as the engine: the filter's name stands in
    assert outcome.mutation == {"tag-a": "a", "tag-b": "b"}
    assert (outcome.context.route, outcome.context.listener) == ("r1", "h:1")
    assert harness.request_filters == harness.filters[:4]  # all override on_request
    assert harness.response_filters == ()  # none overrides on_response
    harness.close()


def test_a_hold_resumes_with_the_next_filter() -> None:
    Tag.calls = []
    with FilterHarness(Tag(label="a"), HoldOnFuture(), Tag(label="b")) as harness:
        held = harness.request({"method": "m"})
        assert held.is_held and Tag.calls == ["a"]
        assert isinstance(held.held, asyncio.Future)
        held.held.set_result(None)  # what the filter's timer or event would do
        done = harness.resume(held)
        assert done.continued and Tag.calls == ["a", "b"]
        assert done.mutation == {"tag-a": "a", "tag-b": "b"}
        with pytest.raises(ValueError, match="only a held request"):
            harness.resume(done)


def test_a_hold_past_the_route_timeout_is_a_timeout_and_a_failed_wait_unspecified() -> None:
    with FilterHarness(HoldOnFuture(), route_timeout=0.01) as harness:
        late = harness.resume(harness.request({}))
        assert late.error is ErrorType.Timeout
        assert late.message == "held by a filter for longer than 0.01s"
        held = harness.request({})
        assert held.held is not None and isinstance(held.held, asyncio.Future)
        held.held.set_exception(OSError("lost"))
        failed = harness.resume(held)
        assert failed.error is ErrorType.Unspecified and isinstance(failed.exception, OSError)


def test_errors_propagate_by_default_or_are_answered_as_the_engine_does() -> None:
    with FilterHarness(Explode()) as harness, pytest.raises(RuntimeError, match="boom"):
        harness.request({})
    with FilterHarness(Explode(), raise_errors=False) as harness:
        outcome = harness.request({})
    assert outcome.error is ErrorType.Unspecified
    assert outcome.message == "filter explode failed: RuntimeError"
    assert isinstance(outcome.exception, RuntimeError)


def test_reply_attributes_reach_filters_only_when_one_asks_for_them() -> None:
    blind = SeeReplies()
    with FilterHarness(blind) as harness:
        context = harness.response(ResponseStatus.Ok, {"server": "a"})
    assert context.attributes is None and blind.seen == [None]
    # In the engine one filter's response_attributes decodes the route's replies for all.
    reader, other = ReadReplies(), SeeReplies()
    with FilterHarness(reader, other) as harness:
        harness.response(ResponseStatus.Ok, {"server": "a"})
    assert [dict(a or {}) for a in reader.seen + other.seen] == [{"server": "a"}] * 2


def test_async_forms_run_on_the_callers_loop() -> None:
    async def main() -> None:
        filt = HoldOnCoroutine()
        harness = FilterHarness(filt)
        with pytest.raises(RuntimeError, match="request_async"):
            harness.request({})
        held = await harness.request_async({"method": "m"})
        assert held.is_held
        filt.gate.set()
        assert (await harness.resume_async(held)).continued
        context = await harness.response_async(ResponseStatus.Error, request=held)
        assert context.request is held.context.request

    asyncio.run(main())


def test_close_drops_holds_never_resumed() -> None:
    harness = FilterHarness(HoldOnCoroutine())
    assert harness.request({}).is_held
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        harness.close()
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_only_filter_instances() -> None:
    with pytest.raises(TypeError, match="from_config"):
        FilterHarness(AuditFilter)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        FilterHarness()


def test_a_local_reply_has_status_error_and_no_attributes() -> None:
    reader = ReadReplies()
    with FilterHarness(reader) as harness:
        local = harness.response(local_error=ErrorType.Timeout)
        assert (local.status, local.attributes) == (ResponseStatus.Error, None)
        remote = harness.response()  # an upstream reply decoded for the reader: no attributes
        assert remote.status is ResponseStatus.Ok
        assert remote.attributes is not None and len(remote.attributes) == 0
        with pytest.raises(ValueError, match="no attributes"):
            harness.response(ResponseStatus.Ok, local_error=ErrorType.Timeout)
