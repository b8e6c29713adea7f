"""A user's filter shipped as its own distribution: it adds ``x-e2e-mark: <mark>`` to every
request's mutation and counts the requests it saw, per instance and for the process."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import ClassVar

from metaprotocol_sdk.filters import Filter, RequestContext

__all__ = ["MarkFilter"]


class MarkFilter(Filter):
    """Marks each request with ``x-e2e-mark``; counts requests in :attr:`requests`."""

    name = "e2e_mark"
    #: Every instance, so a test can find the ones the engine built from its configuration.
    instances: ClassVar[list[MarkFilter]] = []

    def __init__(self, *, mark: str = "e2e") -> None:
        if not isinstance(mark, str) or not mark:
            raise ValueError(f"mark must be a non-empty string, got {mark!r}")
        self.mark = mark
        self.requests = 0
        MarkFilter.instances.append(self)

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        self.requests += 1
        context.add_mutation("x-e2e-mark", self.mark)
        return None
