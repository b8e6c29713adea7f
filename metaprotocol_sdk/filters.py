"""The filter contract: the engine's second extension point, next to the codec.

A filter sits in a listener's chain between the codec and the router (the router is always the
last filter, as in Envoy's generic_proxy and Aeraki's ``meta_protocol_filters``). It never sees
bytes: a request filter sees the request's :class:`~metaprotocol_sdk.metadata.Metadata` and the
route chosen for it, and may

* let the request go on (return ``None``),
* add key-values to the request's mutation (:meth:`RequestContext.add_mutation`),
* answer it locally (:meth:`RequestContext.local_reply`: the codec's ``on_error`` builds the
  reply, with the request's id), or
* hold it for a while without blocking the event loop (return an awaitable; the chain goes on
  when it completes, and the route's timeout bounds the wait).

A response filter sees each answer's status and, when the filter asks for them
(``response_attributes = True``), the reply's attributes.

Filters are plugins found through the entry-point group ``metaprotocol.filters`` under an
Aeraki-style name (``aeraki.meta_protocol.filters.<name>``) and a short alias, exactly as codecs
are, and configured per listener in ``ProxyConfig``. One instance serves every connection of a
listener: keep per-request state in the context, not in the filter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, ClassVar, Self

from .enums import ErrorType, ResponseStatus
from .keywords import from_keywords
from .metadata import Attributes, Metadata

__all__ = ["Filter", "LocalReply", "RequestContext", "ResponseContext"]


class LocalReply:
    """A filter's decision to answer a request itself.

    ``flags``: Envoy's response flag for it, in the access log and Istio's
    ``response_flags`` (``RLSE`` for a request the global rate limit refuses because its
    service failed); ``None``, what :meth:`RequestContext.local_reply` gives: the one of the
    filter's kind (``RL`` for a rate limit, ``FI`` for a fault), or the error type's.
    """

    __slots__ = ("error", "flags", "message")

    def __init__(self, error: ErrorType, message: str, flags: str | None = None) -> None:
        self.error = error
        self.message = message
        self.flags = flags

    def __repr__(self) -> str:
        return f"LocalReply({self.error.name}, {self.message!r})"


class RequestContext:
    """What a request filter sees and may change; one per request."""

    __slots__ = ("listener", "mutation", "reply", "request", "route", "values")

    def __init__(self, request: Metadata, route: str, listener: str) -> None:
        #: The decoded request (read its ``attributes``; do not change them).
        self.request = request
        #: The name of the route chosen for it.
        self.route = route
        #: The listener's name, ``host:port``.
        self.listener = listener
        #: Key-values a filter added, written into the request after the route's own
        #: ``requestMutation`` (``None`` until a filter adds one).
        self.mutation: dict[str, str] | None = None
        #: Set by :meth:`local_reply`; the chain stops there.
        self.reply: LocalReply | None = None
        #: Free-form per-request state shared by the filters of the chain.
        self.values: dict[str, Any] = {}

    def add_mutation(self, key: str, value: str) -> None:
        """Write ``key: value`` into the request on its way upstream."""
        if self.mutation is None:
            self.mutation = {}
        self.mutation[key] = value

    def local_reply(self, error: ErrorType, message: str = "") -> None:
        """Answer the request with the protocol's own error reply instead of forwarding it."""
        self.reply = LocalReply(error, message)


class ResponseContext:
    """What a response filter sees about one answer."""

    __slots__ = (
        "attributes",
        "destination",
        "listener",
        "local_error",
        "request",
        "route",
        "status",
        "upstream",
    )

    def __init__(
        self,
        request: Metadata,
        route: str,
        listener: str,
        status: ResponseStatus,
        attributes: Attributes | None,
        local_error: ErrorType | None,
        destination: str = "",
        upstream: str = "",
    ) -> None:
        #: The request this answers.
        self.request = request
        #: The route's name.
        self.route = route
        #: The listener's name.
        self.listener = listener
        #: The reply's status (``Error`` for a local reply).
        self.status = status
        #: The reply's attributes when the filter declared ``response_attributes``, else
        #: ``None`` (replies are then forwarded without being decoded).
        self.attributes = attributes
        #: The error type when the engine answered locally (a filter, a timeout, ...).
        self.local_error = local_error
        #: The destination (Envoy-style cluster name) the request went to, ``""`` if none.
        self.destination = destination
        #: The upstream endpoint (``address:port``) that answered or failed, ``""`` if none.
        self.upstream = upstream


class Filter:
    """Base class of every filter. Override :meth:`on_request`, :meth:`on_response` or both.

    ``from_config`` builds an instance from the filter's YAML configuration: by default the
    keys are passed as keyword-only arguments of ``__init__`` (as codec options are), with a
    clear :class:`~metaprotocol_sdk.errors.ConfigError` for an unknown key.
    """

    #: The filter's name in configuration and stats.
    name: ClassVar[str] = ""
    #: ``True`` when :meth:`on_response` needs the reply's attributes: replies of the routes
    #: this filter serves are then decoded instead of forwarded untouched.
    response_attributes: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None) -> Self:
        """Build the filter from its configuration mapping."""
        return from_keywords(cls, config, "filter", cls.name or cls.__name__, "setting")

    def on_request(self, context: RequestContext) -> Awaitable[object] | None:
        """Look at (or act on) a request. Return ``None`` to go on, or an awaitable to hold
        the request until it completes."""
        return None

    def on_response(self, context: ResponseContext) -> None:
        """Look at an answer on its way to the client (a reply or a local reply)."""
        return None

    @property
    def handles_requests(self) -> bool:
        """Whether this filter overrides :meth:`on_request` (the engine skips it otherwise)."""
        return type(self).on_request is not Filter.on_request

    @property
    def handles_responses(self) -> bool:
        """Whether this filter overrides :meth:`on_response`."""
        return type(self).on_response is not Filter.on_response
