"""The ``{{ cookiecutter.filter_name }}`` filter: a request goes upstream only when it carries an
attribute (by default ``tenant``), and the checked value travels with it.

A filter never sees bytes: the engine's codec decodes each request into metadata, the chain
runs (this filter among the listener's filters), and the router forwards what is left. So this
filter works in front of any protocol whose codec decodes the attribute.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence

from metaprotocol_sdk.enums import ErrorType
from metaprotocol_sdk.filters import Filter, RequestContext

__all__ = ["{{ cookiecutter.__filter_class }}"]


class {{ cookiecutter.__filter_class }}(Filter):
    """Requires the request attribute ``attribute`` and passes its value upstream as ``mark``.

    * Without the attribute (or with it empty) the request is answered ``BadRequest`` ("missing
      attribute 'tenant'") by the client's own codec and never reaches the upstream.
    * With ``allowed`` values configured, any other value is answered ``BadRequest`` too.
    * Otherwise the request goes on with ``mark: <value>`` added to its mutation (default key
      ``x-checked-<attribute>``), so the upstream knows the engine checked it.

    Configured per listener (``deploy/proxy.yaml``); the settings are the keyword-only
    parameters below, and an unknown one is refused when the configuration loads.
    """

    name = "{{ cookiecutter.filter_name }}"

    def __init__(
        self, *, attribute: str = "tenant", allowed: Sequence[str] = (), mark: str = ""
    ) -> None:
        # A ValueError here becomes a configuration error naming the filter (from_config).
        if not isinstance(attribute, str) or not attribute:
            raise ValueError(f"attribute must be a non-empty string, got {attribute!r}")
        if isinstance(allowed, str) or not all(isinstance(v, str) and v for v in allowed):
            raise ValueError(f"allowed must be a list of non-empty strings, got {allowed!r}")
        if not isinstance(mark, str):
            raise ValueError(f"mark must be a string, got {mark!r}")
        self.attribute = attribute
        self.allowed = frozenset(allowed)
        self.mark = mark or f"x-checked-{attribute}"

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        """Refuse the request locally, or let it go on with the mark added."""
        # Attribute names are case-insensitive, as in route matches.
        value = context.request.attributes.get(self.attribute)
        if not value:
            context.local_reply(ErrorType.BadRequest, f"missing attribute {self.attribute!r}")
        elif self.allowed and value not in self.allowed:
            context.local_reply(ErrorType.BadRequest, f"{self.attribute} {value!r} is not allowed")
        else:
            context.add_mutation(self.mark, value)
        return None
