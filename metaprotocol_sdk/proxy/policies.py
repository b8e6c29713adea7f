"""The mesh's traffic policies that run as filters: local rate limit and fault injection.

Mirroring and retries live in the router (``downstream.py``), since they send requests; they
are configured on the same routes. Each policy costs nothing on a route that does not have it:
a route's chain is empty unless something is configured for it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from metaprotocol_sdk.enums import ErrorType
from metaprotocol_sdk.filters import Filter, RequestContext
from metaprotocol_sdk.metadata import Attributes

from .config.models import Fault, LocalRateLimit, TokenBucket
from .matcher import Matcher, compile_match
from .stats import Counter, Stats


def _sampler(percent: float, draw: Callable[[], float]) -> Callable[[], bool]:
    """``True`` for ``percent`` % of calls (always for 100, never for 0)."""
    if percent >= 100:
        return lambda: True
    if percent <= 0:
        return lambda: False
    share = percent / 100
    return lambda: draw() < share


class FaultDelay(Filter):
    """Holds a share of a route's requests for a fixed delay (``fault.delay``)."""

    name = "fault.delay"

    def __init__(
        self,
        fault: Fault,
        loop: asyncio.AbstractEventLoop,
        counter: Counter,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._delay = fault.delay
        self._loop = loop
        self._hit = _sampler(fault.delay_percent, draw)
        self._counter = counter

    def on_request(self, context: RequestContext) -> Awaitable[object] | None:
        if not self._hit():
            return None
        self._counter.value += 1
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._loop.call_later(self._delay, _wake, waiter)  # no task per request
        return waiter


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # cancelled when the request timed out or its client left
        waiter.set_result(None)


class FaultAbort(Filter):
    """Answers a share of a route's requests with the configured error (``fault.abort``)."""

    name = "fault.abort"

    def __init__(
        self, fault: Fault, counter: Counter, draw: Callable[[], float] = random.random
    ) -> None:
        self._error = fault.abort_error
        self._hit = _sampler(fault.abort_percent, draw)
        self._counter = counter

    def on_request(self, context: RequestContext) -> Awaitable[object] | None:
        if self._hit():
            self._counter.value += 1
            context.local_reply(self._error, "fault injected by the proxy")
        return None


class Bucket:
    """A token bucket (``spec``) refilled lazily from the clock (no timer), full at first."""

    __slots__ = ("filled_at", "interval", "most", "per_fill", "spec", "tokens")

    def __init__(self, spec: TokenBucket, now: float) -> None:
        self.spec = spec
        self.most = spec.max_tokens
        self.per_fill = spec.tokens_per_fill
        self.interval = spec.fill_interval
        self.tokens = spec.max_tokens
        self.filled_at = now

    def take(self, now: float) -> bool:
        """Take a token if there is one."""
        fills = int((now - self.filled_at) / self.interval)
        if fills:
            self.tokens = min(self.most, self.tokens + fills * self.per_fill)
            self.filled_at += fills * self.interval
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False


class _Bucket(Bucket):
    """A request rate limit's bucket, counting what it allowed and limited."""

    __slots__ = ("allowed", "limited")

    def __init__(self, spec: TokenBucket, now: float, allowed: Counter, limited: Counter) -> None:
        super().__init__(spec, now)
        self.allowed = allowed
        self.limited = limited

    def take(self, now: float) -> bool:
        """Take a token if there is one, and count the outcome."""
        if super().take(now):
            self.allowed.value += 1
            return True
        self.limited.value += 1
        return False


class ConnectionRateLimit(Bucket):
    """A listener's ``connectionRateLimit`` (Envoy's listener filter ``local_ratelimit``):
    one token per accepted connection; ``refused`` counts those that found none."""

    __slots__ = ("refused",)

    def __init__(self, spec: TokenBucket, now: float, refused: Counter) -> None:
        super().__init__(spec, now)
        self.refused = refused


class LocalRateLimiter(Filter):
    """Aeraki's ``localRateLimit``: the first matching condition's bucket, else the default
    bucket, else no limit; over the limit the client gets ``OverLimit`` from its own codec."""

    name = "local_rate_limit"

    def __init__(
        self,
        limit: LocalRateLimit,
        clock: Callable[[], float],
        stats: Stats,
        listener: str,
    ) -> None:
        now = clock()
        self._clock = clock

        def bucket(spec: TokenBucket, name: str) -> _Bucket:
            def counter(result: str) -> Counter:
                return stats.counter(
                    "metaprotocol_ratelimit_total", listener=listener, bucket=name, result=result
                )

            return _Bucket(spec, now, counter("allowed"), counter("limited"))

        self._conditions: tuple[tuple[Matcher, _Bucket], ...] = tuple(
            (compile_match(c.match), bucket(c.bucket, f"conditions[{i}]"))
            for i, c in enumerate(limit.conditions)
        )
        self._default = bucket(limit.bucket, "default") if limit.bucket else None

    def _bucket_for(self, attributes: Attributes) -> _Bucket | None:
        for matches, bucket in self._conditions:
            if matches(attributes):
                return bucket
        return self._default

    def on_request(self, context: RequestContext) -> Awaitable[object] | None:
        bucket = self._bucket_for(context.request.attributes)
        if bucket is not None and not bucket.take(self._clock()):
            context.local_reply(ErrorType.OverLimit, "rate limited by the proxy")
        return None
