"""Drive a filter without sockets, as the conformance kit drives a codec.

:class:`FilterHarness` runs one filter (or a chain of them) the way the engine does: request
filters in order, stopping at the first local reply, pausing at the first awaitable (a hold)
and going on from the next filter once it completes; response filters see each answer, with
the reply's attributes only when one of them asks for them. Each request gives a
:class:`RequestOutcome`::

    harness = FilterHarness(AuditFilter.from_config({"auditor": "ci", "required": ["method"]}))
    outcome = harness.request({"method": "sayHello"})
    assert outcome.continued and outcome.mutation == {"x-audited-by": "ci"}
    assert harness.request({}).error is ErrorType.BadRequest

:func:`check_filter` (or, in pytest, a subclass of :class:`FilterConformance`) checks what
every filter owes the engine: ``from_config`` refuses an unknown setting with a
:class:`~metaprotocol_sdk.errors.ConfigError` naming it, and ``on_request`` /
``on_response`` raise nothing (and return what the contract allows) for ordinary traffic:
a few typical requests and answers, then hypothesis-generated ones.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from metaprotocol_sdk.enums import ErrorType, MessageType, ResponseStatus
from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.filters import Filter, LocalReply, RequestContext, ResponseContext
from metaprotocol_sdk.metadata import Attributes, Metadata
from metaprotocol_sdk.registry import resolve_filter

if TYPE_CHECKING:  # hypothesis is needed by the checks only, imported when they run
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "DEFAULT_LISTENER",
    "DEFAULT_ROUTE_TIMEOUT",
    "FilterCheckError",
    "FilterConformance",
    "FilterHarness",
    "RequestOutcome",
    "check_filter",
    "check_ordinary_traffic",
    "check_refuses_unknown_config",
]

#: The engine's default route timeout (``ProxyConfig.timeouts.route``): it bounds a hold.
DEFAULT_ROUTE_TIMEOUT = 30.0
#: The listener name the harness reports unless told otherwise (``host:port``).
DEFAULT_LISTENER = "svc.test:9000"

OutcomeKind = Literal["continued", "replied", "held"]
_T = TypeVar("_T")


class RequestOutcome:
    """What a filter chain decided for one request.

    ``kind`` is ``"continued"`` (the router would forward the request, with :attr:`mutation`
    written into it), ``"replied"`` (answered locally: :attr:`error`, :attr:`message`) or
    ``"held"`` (a filter returned :attr:`held`; :meth:`FilterHarness.resume` completes it and
    goes on with the chain).
    """

    __slots__ = ("context", "exception", "filter", "held", "kind", "reply", "resume_at")

    def __init__(
        self,
        kind: OutcomeKind,
        context: RequestContext,
        filter: Filter | None = None,
        reply: LocalReply | None = None,
        held: Awaitable[Any] | None = None,
        resume_at: int = 0,
        exception: BaseException | None = None,
    ) -> None:
        #: ``"continued"``, ``"replied"`` or ``"held"``.
        self.kind: OutcomeKind = kind
        #: The request's context, as the filters left it.
        self.context = context
        #: The filter that answered or holds the request (``None`` when it continued).
        self.filter = filter
        #: The local reply (``kind == "replied"``), as the engine would send it.
        self.reply = reply
        #: The awaitable a filter returned (``kind == "held"``).
        self.held = held
        #: Index of the next request filter once the hold completes.
        self.resume_at = resume_at
        #: What a filter raised, when the harness answers errors as the engine does.
        self.exception = exception

    @property
    def continued(self) -> bool:
        """Whether the request would go on to the router."""
        return self.kind == "continued"

    @property
    def replied(self) -> bool:
        """Whether the request was answered locally."""
        return self.kind == "replied"

    @property
    def is_held(self) -> bool:
        """Whether a filter holds the request."""
        return self.kind == "held"

    @property
    def mutation(self) -> dict[str, str]:
        """What the filters added to the request's mutation so far (``{}``: nothing)."""
        return dict(self.context.mutation or {})

    @property
    def error(self) -> ErrorType | None:
        """The local reply's error type (``None`` unless replied)."""
        return None if self.reply is None else self.reply.error

    @property
    def message(self) -> str:
        """The local reply's message (``""`` unless replied)."""
        return "" if self.reply is None else self.reply.message

    def __repr__(self) -> str:
        if self.kind == "replied":
            return f"RequestOutcome(replied {self.reply!r})"
        if self.kind == "held":
            return f"RequestOutcome(held by {_name(self.filter)}, mutation={self.mutation!r})"
        return f"RequestOutcome(continued, mutation={self.mutation!r})"


def _name(f: Filter | type[Filter] | None) -> str:
    if f is None:
        return "nothing"
    cls = f if isinstance(f, type) else type(f)
    return cls.name or cls.__name__


def _discard(waiting: Awaitable[Any]) -> None:
    """Drop an awaitable that will not be awaited (no "never awaited" warning)."""
    if isinstance(waiting, asyncio.Future):
        waiting.cancel()
    elif inspect.iscoroutine(waiting):
        waiting.close()


class FilterHarness:
    """Runs filters as the engine's chain does, without sockets or a codec.

    ``filters`` are instances in chain order (build them with ``from_config``, as the engine
    does). ``raise_errors`` ``True`` (the default) lets an exception from a filter propagate,
    so a test sees it; ``False`` answers it as the engine does (``Unspecified``, "filter NAME
    failed: ExceptionType") with the exception in :attr:`RequestOutcome.exception`.

    The synchronous methods run the filters on the harness's own event loop (filters may call
    ``asyncio.get_running_loop()``); inside a running loop use the ``*_async`` forms. Close
    the harness (or use it as a context manager) to drop holds never resumed.
    """

    def __init__(
        self,
        *filters: Filter,
        route_timeout: float = DEFAULT_ROUTE_TIMEOUT,
        raise_errors: bool = True,
    ) -> None:
        if not filters:
            raise ValueError("FilterHarness needs at least one filter")
        for f in filters:
            if not isinstance(f, Filter):
                raise TypeError(f"{f!r} is not a Filter instance (build it with from_config)")
        self.filters = filters
        # As the engine: only filters that override a hook are in that chain.
        self.request_filters = tuple(f for f in filters if f.handles_requests)
        self.response_filters = tuple(f for f in filters if f.handles_responses)
        #: Whether replies would be decoded for these filters (one asks for attributes).
        self.decode_replies = any(f.response_attributes for f in self.response_filters)
        self.route_timeout = route_timeout
        self.raise_errors = raise_errors
        self._loop: asyncio.AbstractEventLoop | None = None
        self._holds: list[RequestOutcome] = []

    # -- requests --------------------------------------------------------------------------

    def request(
        self,
        attributes: Mapping[str, str] | None = None,
        *,
        route: str = "default",
        listener: str = DEFAULT_LISTENER,
        request_id: int = 1,
        operation_name: str = "",
    ) -> RequestOutcome:
        """Run a request with these attributes through the request filters."""
        return self._run(
            self.request_async(
                attributes,
                route=route,
                listener=listener,
                request_id=request_id,
                operation_name=operation_name,
            )
        )

    async def request_async(
        self,
        attributes: Mapping[str, str] | None = None,
        *,
        route: str = "default",
        listener: str = DEFAULT_LISTENER,
        request_id: int = 1,
        operation_name: str = "",
    ) -> RequestOutcome:
        """:meth:`request` on the running event loop."""
        attrs = Attributes(attributes)
        message = Metadata(
            MessageType.Request,
            request_id=request_id,
            operation_name=operation_name or attrs.get("method", ""),
            attributes=attrs,
        )
        return self._chain(RequestContext(message, route, listener), 0)

    def _chain(self, context: RequestContext, first: int) -> RequestOutcome:
        """The engine's ``Downstream._filter``, minus the router."""
        filters = self.request_filters
        for i in range(first, len(filters)):
            f = filters[i]
            try:
                waiting = f.on_request(context)
            except Exception as exc:
                if self.raise_errors:
                    raise
                reply = LocalReply(
                    ErrorType.Unspecified, f"filter {_name(f)} failed: {type(exc).__name__}"
                )
                return RequestOutcome("replied", context, f, reply, exception=exc)
            if context.reply is not None:
                reply = LocalReply(context.reply.error, context.reply.message or f.name)
                if waiting is not None:
                    _discard(waiting)
                return RequestOutcome("replied", context, f, reply)
            if waiting is not None:
                outcome = RequestOutcome("held", context, f, held=waiting, resume_at=i + 1)
                self._holds.append(outcome)
                return outcome
        return RequestOutcome("continued", context)

    def resume(self, outcome: RequestOutcome, timeout: float | None = None) -> RequestOutcome:
        """Complete a hold and go on with the chain; returns the new outcome.

        The wait is bounded by ``timeout`` (default: the harness's route timeout): past it the
        request is answered ``Timeout``, as the engine does; an awaitable that fails or is
        cancelled gives ``Unspecified``.
        """
        return self._run(self.resume_async(outcome, timeout))

    async def resume_async(
        self, outcome: RequestOutcome, timeout: float | None = None
    ) -> RequestOutcome:
        """:meth:`resume` on the running event loop."""
        if outcome.kind != "held" or outcome.held is None:
            raise ValueError(f"only a held request can be resumed, not {outcome!r}")
        if outcome in self._holds:
            self._holds.remove(outcome)
        limit = self.route_timeout if timeout is None else timeout
        future = asyncio.ensure_future(outcome.held)
        await asyncio.wait((future,), timeout=limit)
        context = outcome.context
        if not future.done():
            future.cancel()
            message = f"held by a filter for longer than {limit:g}s"
            return RequestOutcome(
                "replied", context, outcome.filter, LocalReply(ErrorType.Timeout, message)
            )
        if future.cancelled() or future.exception() is not None:
            reply = LocalReply(ErrorType.Unspecified, "a filter's wait failed")
            exc = None if future.cancelled() else future.exception()
            return RequestOutcome("replied", context, outcome.filter, reply, exception=exc)
        if context.reply is not None:  # the filter decided once its wait was over
            name = outcome.filter.name if outcome.filter is not None else ""
            reply = LocalReply(context.reply.error, context.reply.message or name)
            return RequestOutcome("replied", context, outcome.filter, reply)
        return self._chain(context, outcome.resume_at)

    # -- responses -------------------------------------------------------------------------

    def response(
        self,
        status: ResponseStatus | None = None,
        attributes: Mapping[str, str] | None = None,
        *,
        local_error: ErrorType | None = None,
        request: RequestOutcome | Mapping[str, str] | None = None,
        route: str = "default",
        listener: str = DEFAULT_LISTENER,
    ) -> ResponseContext:
        """Show an answer to the response filters; returns the context they saw.

        An upstream reply has a ``status`` (default ``Ok``) and maybe ``attributes``; these
        reach the filters only when one of them declares ``response_attributes`` (otherwise
        the engine forwards replies undecoded and they see ``None``). A local reply is
        ``local_error`` alone: as in the engine its status is ``Error`` and it has no
        attributes. ``request`` is the outcome of :meth:`request` (its request and route are
        used) or the attributes of the request this answers.
        """
        return self._run(
            self.response_async(
                status,
                attributes,
                local_error=local_error,
                request=request,
                route=route,
                listener=listener,
            )
        )

    async def response_async(
        self,
        status: ResponseStatus | None = None,
        attributes: Mapping[str, str] | None = None,
        *,
        local_error: ErrorType | None = None,
        request: RequestOutcome | Mapping[str, str] | None = None,
        route: str = "default",
        listener: str = DEFAULT_LISTENER,
    ) -> ResponseContext:
        """:meth:`response` on the running event loop."""
        if local_error is not None:
            if attributes is not None or status not in (None, ResponseStatus.Error):
                raise ValueError("a local reply has status Error and no attributes")
            status = ResponseStatus.Error
        elif status is None:
            status = ResponseStatus.Ok
        if isinstance(request, RequestOutcome):
            message = request.context.request
            route, listener = request.context.route, request.context.listener
        else:
            message = Metadata(MessageType.Request, request_id=1, attributes=Attributes(request))
        # A decoded upstream reply always has attributes (maybe none); a local reply has none.
        seen = Attributes(attributes) if self.decode_replies and local_error is None else None
        context = ResponseContext(message, route, listener, status, seen, local_error)
        for f in self.response_filters:
            f.on_response(context)  # the engine counts these errors; a test should see them
        return context

    # -- the loop --------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise RuntimeError(
                "FilterHarness: inside a running event loop use request_async, "
                "resume_async and response_async"
            )
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        """Drop the holds never resumed and close the harness's event loop."""
        for outcome in self._holds:
            if outcome.held is not None:
                _discard(outcome.held)
        self._holds.clear()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.run_until_complete(asyncio.sleep(0))  # let cancellations settle
            loop.close()

    def __enter__(self) -> FilterHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- checks ------------------------------------------------------------------------------------


class FilterCheckError(AssertionError):
    """A filter broke a rule every filter owes the engine; the message says which, and how."""


#: A setting name no filter is expected to accept.
UNKNOWN_SETTING = "no_such_setting_for_the_filter_check"


def check_refuses_unknown_config(
    filter_class: type[Filter], config: Mapping[str, Any] | None = None
) -> None:
    """``from_config`` builds from ``config`` and refuses ``config`` plus an unknown key with
    a :class:`~metaprotocol_sdk.errors.ConfigError` naming the key (the engine turns it into
    a configuration error naming ``listeners[i].filters[j].config.<key>``)."""
    base = dict(config or {})
    name = _name(filter_class)
    try:
        filter_class.from_config(base)
    except Exception as exc:
        raise FilterCheckError(
            f"{name}.from_config({base!r}) refused a valid configuration: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    bad = {**base, UNKNOWN_SETTING: 1}
    try:
        filter_class.from_config(bad)
    except ConfigError as exc:
        if exc.field != UNKNOWN_SETTING and UNKNOWN_SETTING not in str(exc):
            raise FilterCheckError(
                f"{name}.from_config refused an unknown setting without naming it: {exc}"
            ) from None
        return
    except Exception as exc:
        raise FilterCheckError(
            f"{name}.from_config raised {type(exc).__name__} for an unknown setting instead "
            f"of ConfigError: {exc}"
        ) from None
    raise FilterCheckError(
        f"{name}.from_config accepted the unknown setting {UNKNOWN_SETTING!r}: a typo in a "
        f"user's configuration would be silently ignored"
    )


_COMMON_KEYS = ("method", "interface", "service", "version", "group", "x-user", "x-tenant")


#: An answer: ``(status, reply attributes, local error)``.
_Answer = tuple[ResponseStatus, dict[str, str] | None, ErrorType | None]
_Example = tuple[dict[str, str], str, _Answer]

#: Tried first, in this order: the ordinary cases a failure is easiest to read from.
_ORDINARY: tuple[_Example, ...] = (
    ({}, "default", (ResponseStatus.Ok, {}, None)),
    (
        {"interface": "com.example.Greeter", "method": "sayHello", "version": "1.0.0"},
        "default",
        (ResponseStatus.Ok, {"server": "a"}, None),
    ),
    ({"method": "sayHello"}, "route-a", (ResponseStatus.Error, {}, None)),
    ({"method": "sayHello"}, "route-a", (ResponseStatus.Error, None, ErrorType.OverLimit)),
    ({"method": ""}, "", (ResponseStatus.Unknown, {}, None)),
)


def _traffic() -> SearchStrategy[_Example]:
    """Hypothesis strategy of ``(request attributes, route, answer)``: what a codec may
    decode, including empty and odd strings; an answer is an upstream reply (any status) or
    a local reply (any error type)."""
    from hypothesis import strategies as st

    key = st.one_of(
        st.sampled_from(_COMMON_KEYS),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_.", min_size=1, max_size=16),
    )
    attributes = st.dictionaries(key, st.text(max_size=64), max_size=8)
    upstream = st.tuples(st.sampled_from(tuple(ResponseStatus)), attributes, st.none())
    local = st.tuples(st.just(ResponseStatus.Error), st.none(), st.sampled_from(tuple(ErrorType)))
    return st.tuples(attributes, st.sampled_from(("default", "route-a", "")), upstream | local)


def check_ordinary_traffic(
    filter_class: type[Filter],
    config: Mapping[str, Any] | None = None,
    *,
    max_examples: int = 200,
    derandomize: bool = True,
) -> None:
    """``on_request`` and ``on_response`` raise nothing for ordinary requests and answers
    (a few typical ones first, then generated ones), and ``on_request`` returns what the
    contract allows: ``None`` or an awaitable, a local reply with an ``ErrorType``, a mutation
    of strings. Holds are checked to be awaitable but not awaited (a filter's delay would slow
    the check down). One instance serves every example, as one serves every request of a
    listener."""
    from hypothesis import HealthCheck, example, given, settings

    name = _name(filter_class)
    instance = filter_class.from_config(config)
    harness = FilterHarness(instance)

    def fail(hook: str, inputs: str, why: str) -> FilterCheckError:
        return FilterCheckError(f"{name}.{hook} {why}\n  input: {inputs}")

    def run(case: _Example) -> None:
        attrs, route, (status, reply_attrs, local_error) = case
        inputs = f"attributes={attrs!r}, route={route!r}"
        try:
            outcome = harness.request(attrs, route=route)
        except Exception as exc:
            raise fail("on_request", inputs, f"raised {type(exc).__name__}: {exc}") from None
        _check_outcome(outcome, lambda why: fail("on_request", inputs, why))
        if outcome.held is not None:
            harness._holds.remove(outcome)
            _discard(outcome.held)
        if local_error is None:
            inputs = f"status={status.name}, reply attributes={reply_attrs!r}"
        else:
            inputs = f"local reply {local_error.name}"
        inputs += f", request attributes={attrs!r}, route={route!r}"
        try:
            if local_error is None:
                harness.response(status, reply_attrs, request=outcome)
            else:
                harness.response(local_error=local_error, request=outcome)
        except Exception as exc:
            raise fail("on_response", inputs, f"raised {type(exc).__name__}: {exc}") from None

    test = given(_traffic())(run)
    for case in reversed(_ORDINARY):  # decorators apply bottom-up; run them in order
        test = example(case)(test)
    test = settings(
        max_examples=max_examples,
        derandomize=derandomize,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
    )(test)
    try:
        test()
    finally:
        harness.close()


def _check_outcome(outcome: RequestOutcome, fail: Callable[[str], FilterCheckError]) -> None:
    """What ``on_request`` left must be something the engine can act on."""
    reply = outcome.context.reply
    if reply is not None and not isinstance(reply.error, ErrorType):
        raise fail(f"answered with {reply.error!r}, which is not an ErrorType")
    if reply is not None and not isinstance(reply.message, str):
        raise fail(f"answered with a message that is not a str: {reply.message!r}")
    for key, value in (outcome.context.mutation or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise fail(
                f"added a mutation that is not str to str: {key!r}: {value!r} (the codec "
                f"would refuse it and the client get BadRequest)"
            )
    if outcome.held is not None and not inspect.isawaitable(outcome.held):
        raise fail(f"returned {outcome.held!r}, which is neither None nor an awaitable")


def check_filter(
    filter_class: type[Filter],
    config: Mapping[str, Any] | None = None,
    *,
    max_examples: int = 200,
    derandomize: bool = True,
) -> None:
    """Every check of this module: :func:`check_refuses_unknown_config` and
    :func:`check_ordinary_traffic`. Raises :class:`FilterCheckError` on the first failure."""
    check_refuses_unknown_config(filter_class, config)
    check_ordinary_traffic(filter_class, config, max_examples=max_examples, derandomize=derandomize)


class FilterConformance:
    """The pytest front end of :func:`check_filter`: subclass it, set :attr:`filter`, and each
    check is a test::

        class TestAudit(FilterConformance):
            filter = AuditFilter
            config = {"required": ["method"]}
    """

    #: The filter class, an installed filter name, or a ``module:Class`` reference.
    filter: ClassVar[type[Filter] | str | None] = None
    #: A valid configuration to build it from (default: none).
    config: ClassVar[Mapping[str, Any] | None] = None
    #: Generated examples for :func:`check_ordinary_traffic`.
    max_examples: ClassVar[int] = 200

    @classmethod
    def filter_class(cls) -> type[Filter]:
        """The filter under test, resolved through the registry when given by name."""
        target = cls.filter
        if target is None:
            raise TypeError(f"{cls.__name__}: set the class attribute 'filter'")
        if isinstance(target, str):
            return resolve_filter(target).load()
        return target

    def test_refuses_unknown_config(self) -> None:
        """:func:`check_refuses_unknown_config`."""
        check_refuses_unknown_config(self.filter_class(), self.config)

    def test_ordinary_traffic(self) -> None:
        """:func:`check_ordinary_traffic`."""
        check_ordinary_traffic(self.filter_class(), self.config, max_examples=self.max_examples)
