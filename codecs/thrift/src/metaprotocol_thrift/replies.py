"""Mapping of the engine's local error types onto ``TApplicationException`` type codes."""

from __future__ import annotations

from metaprotocol_sdk.enums import ErrorType

from . import wire

#: ``ErrorType`` -> ``TApplicationException`` type code sent in error replies.
APPLICATION_EXCEPTION_TYPES: dict[ErrorType, int] = {
    ErrorType.RouteNotFound: wire.TAPP_UNKNOWN_METHOD,
    ErrorType.ClusterNotFound: wire.TAPP_INTERNAL_ERROR,
    ErrorType.NoHealthyUpstream: wire.TAPP_INTERNAL_ERROR,
    ErrorType.BadResponse: wire.TAPP_MISSING_RESULT,
    ErrorType.Unspecified: wire.TAPP_UNKNOWN,
    ErrorType.OverLimit: wire.TAPP_INTERNAL_ERROR,
    ErrorType.Timeout: wire.TAPP_INTERNAL_ERROR,
    ErrorType.UpstreamConnectFailure: wire.TAPP_INTERNAL_ERROR,
    ErrorType.UpstreamReset: wire.TAPP_INTERNAL_ERROR,
    ErrorType.BadRequest: wire.TAPP_PROTOCOL_ERROR,
    ErrorType.ShuttingDown: wire.TAPP_INTERNAL_ERROR,
    ErrorType.PermissionDenied: wire.TAPP_UNKNOWN,
}

_DEFAULT_MESSAGES: dict[ErrorType, str] = {
    ErrorType.RouteNotFound: "no route for this method",
    ErrorType.ClusterNotFound: "no cluster for this route",
    ErrorType.NoHealthyUpstream: "no healthy upstream",
    ErrorType.BadResponse: "bad response from upstream",
    ErrorType.Unspecified: "local error",
    ErrorType.OverLimit: "over limit (rate limited)",
    ErrorType.Timeout: "upstream request timeout",
    ErrorType.UpstreamConnectFailure: "upstream connect failure",
    ErrorType.UpstreamReset: "upstream connection reset",
    ErrorType.BadRequest: "bad request",
    ErrorType.ShuttingDown: "proxy is shutting down",
    ErrorType.PermissionDenied: "RBAC: access denied",
}


def error_text(error_type: ErrorType, message: str) -> str:
    """The readable message put into the ``TApplicationException``."""
    error_type = ErrorType(error_type)
    detail = message or _DEFAULT_MESSAGES.get(error_type, "local error")
    return f"{error_type.name}: {detail}"
