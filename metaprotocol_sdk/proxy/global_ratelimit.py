"""Aeraki's ``globalRateLimit``: a request filter that asks a rate limit service.

This module decides; it does no I/O. Requests matching ``match`` get one descriptor per
configured ``property`` they carry (Aeraki's shape: each descriptor has one entry,
``descriptorKey = <value>``); a request carrying none of them is not limited (nothing to
ask, like Envoy's ``request_headers`` action when the header is absent). The request is held
while a :class:`RateLimitService` (the gRPC client of ``rls_client``) answers; then ``OK``
goes on, ``OVER_LIMIT`` is answered ``OverLimit`` by the client's own codec, and a failure
(unreachable, an error, slower than ``requestTimeout``, or the process already at
``limits.maxRateLimitCalls`` outstanding calls) is denied or let through by ``denyOnFail``.

Routes of a MetaRouter without ``globalRateLimit`` never see this filter: their chain is as
without the feature.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol

from metaprotocol_sdk.enums import ErrorType
from metaprotocol_sdk.filters import Filter, LocalReply, RequestContext
from metaprotocol_sdk.metadata import Attributes

from .config.models import GlobalRateLimit, RateLimitDescriptor
from .matcher import compile_match
from .stats import Counter, Stats

#: What a checked request came to (``metaprotocol_global_ratelimit_total{result}``); each
#: request matching ``match`` is counted once.
RESULTS = ("ok", "over_limit", "failure_allowed", "failure_denied", "skipped", "cancelled")
#: Why a call failed (``metaprotocol_global_ratelimit_failures_total{reason}``): the service
#: is unreachable, it answered with a gRPC error (or a reply that does not decode), it did not
#: answer within ``requestTimeout``, or the call was never made because the process had
#: ``limits.maxRateLimitCalls`` outstanding.
FAILURES = ("unavailable", "error", "timeout", "overflow")

#: Envoy's response flag of a request refused because the rate limit service failed
#: (``denyOnFail``); one it answered ``OVER_LIMIT`` is ``RL``.
RATE_LIMIT_SERVICE_ERROR = "RLSE"

#: One descriptor: its entries, ``(key, value)``, in order.
Descriptor = tuple[tuple[str, str], ...]


def missing_extra() -> str | None:
    """Why ``globalRateLimit`` cannot run here (gRPC or Envoy's protos missing), or ``None``."""
    try:
        import grpc  # noqa: F401
        from envoy.service.ratelimit.v3 import rls_pb2_grpc  # noqa: F401
    except ImportError as exc:
        return (
            f"needs gRPC and Envoy's rate limit service API ({exc}): "
            "pip install 'metaprotocol-sdk[ratelimit]'"
        )
    return None


class RateLimitServiceError(Exception):
    """A call to the rate limit service failed; ``reason`` is one of :data:`FAILURES`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class RateLimitService(Protocol):
    """What the filter needs of the rate limit service's client."""

    def should_rate_limit(
        self, domain: str, descriptors: list[Descriptor], timeout: float
    ) -> Coroutine[Any, Any, bool]:
        """``True`` when the service answers ``OVER_LIMIT``; raises
        :class:`RateLimitServiceError` when the call fails or outlasts ``timeout``."""
        ...


def descriptors_for(
    wanted: tuple[RateLimitDescriptor, ...], attributes: Attributes
) -> list[Descriptor]:
    """One descriptor per property the request carries (attribute names case-insensitive)."""
    table = attributes.folded_items
    out: list[Descriptor] = []
    for item in wanted:
        found = table.get(item.property.lower())
        if found is not None:
            out.append(((item.key, found[1]),))
    return out


class CallBudget:
    """The process's outstanding calls to rate limit services, and their ceiling."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int, active: Counter) -> None:
        self.limit = limit
        #: The ``metaprotocol_global_ratelimit_calls_active`` gauge itself.
        self.active = active


class GlobalRateLimiter(Filter):
    """Asks the rate limit service about each matching request (see the module's doc)."""

    name = "global_rate_limit"

    def __init__(
        self,
        limit: GlobalRateLimit,
        service: RateLimitService,
        budget: CallBudget,
        loop: asyncio.AbstractEventLoop,
        stats: Stats,
        listener: str,
    ) -> None:
        self._matches = compile_match(limit.match)
        self._wanted = limit.descriptors
        self._domain = limit.domain
        self._timeout = limit.request_timeout
        self._deny = limit.deny_on_fail
        self._service = service
        self._budget = budget
        self._loop = loop
        self._results = {
            r: stats.counter("metaprotocol_global_ratelimit_total", listener=listener, result=r)
            for r in RESULTS
        }
        self._failures = {
            r: stats.counter(
                "metaprotocol_global_ratelimit_failures_total", listener=listener, reason=r
            )
            for r in FAILURES
        }

    def on_request(self, context: RequestContext) -> Awaitable[object] | None:
        attributes = context.request.attributes
        if not self._matches(attributes):
            return None
        descriptors = descriptors_for(self._wanted, attributes)
        if not descriptors:
            self._results["skipped"].value += 1
            return None
        active = self._budget.active
        if active.value >= self._budget.limit:
            self._failed(context, "overflow")
            return None
        # Counted now, not when the task first runs: a read of many requests must not pass
        # the ceiling before any of their calls started.
        active.value += 1
        task = self._loop.create_task(self._ask(context, descriptors))
        task.add_done_callback(self._finished)
        return task  # cancelled by the engine when the client leaves or the route times out

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._budget.active.value -= 1
        if task.cancelled():
            self._results["cancelled"].value += 1

    async def _ask(self, context: RequestContext, descriptors: list[Descriptor]) -> None:
        try:
            over = await self._service.should_rate_limit(self._domain, descriptors, self._timeout)
        except RateLimitServiceError as exc:
            self._failed(context, exc.reason)
            return
        if over:
            self._results["over_limit"].value += 1
            context.local_reply(ErrorType.OverLimit, "rate limited by the rate limit service")
        else:
            self._results["ok"].value += 1

    def _failed(self, context: RequestContext, reason: str) -> None:
        """Apply ``denyOnFail`` to a request whose call failed (or was never made)."""
        self._failures[reason].value += 1
        if self._deny:
            self._results["failure_denied"].value += 1
            # Envoy's flag for a request refused because the service failed (an answer
            # OVER_LIMIT gets the filter's own, RL). Let through, a request gets none there.
            context.reply = LocalReply(
                ErrorType.OverLimit,
                f"the rate limit service failed ({reason}); denyOnFail",
                RATE_LIMIT_SERVICE_ERROR,
            )
        else:
            self._results["failure_allowed"].value += 1
