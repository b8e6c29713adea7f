"""A worked example of the filter contract: an audit filter.

It marks every request it lets through with an ``x-audited-by`` mutation, answers requests
that lack a required attribute with a local ``BadRequest`` (the client's own codec builds the
reply, with the request's id), and counts the answers of its listener by status.

Configured per listener in ``ProxyConfig``::

    listeners:
      - host: greeter.example
        port: 9000
        bind: "127.0.0.1:0"
        filters:
          - name: metaprotocol_sdk.examples.audit_filter:AuditFilter
            config: {auditor: mesh-audit, required: [method, x-user]}

A distribution would register it in the ``metaprotocol.filters`` entry-point group, under
``aeraki.meta_protocol.filters.audit`` and the alias ``audit``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Sequence

from metaprotocol_sdk.enums import ErrorType
from metaprotocol_sdk.filters import Filter, RequestContext, ResponseContext

__all__ = ["AuditFilter"]


class AuditFilter(Filter):
    """Marks requests with ``x-audited-by: <auditor>``; refuses those missing a ``required``
    attribute with ``BadRequest``; counts answers by status in :attr:`answers`."""

    name = "audit"

    def __init__(self, *, auditor: str = "metaprotocol", required: Sequence[str] = ()) -> None:
        # Wrong types are a ValueError: from_config turns it into a ConfigError.
        if not isinstance(auditor, str) or not auditor:
            raise ValueError(f"auditor must be a non-empty string, got {auditor!r}")
        if isinstance(required, str) or not all(isinstance(k, str) and k for k in required):
            raise ValueError(f"required must be a list of attribute names, got {required!r}")
        self.auditor = auditor
        self.required = tuple(required)
        #: Answers seen, by status name (``Ok``, ``Error``) or local error type
        #: (``OverLimit``, ``Timeout``, ...). One instance serves one listener.
        self.answers: Counter[str] = Counter()

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        attributes = context.request.attributes
        for key in self.required:
            if key not in attributes:  # keys are case-insensitive, as in routing
                context.local_reply(ErrorType.BadRequest, f"missing attribute {key!r}")
                return None
        context.add_mutation("x-audited-by", self.auditor)
        return None

    def on_response(self, context: ResponseContext) -> None:
        error = context.local_error
        self.answers[context.status.name if error is None else error.name] += 1
