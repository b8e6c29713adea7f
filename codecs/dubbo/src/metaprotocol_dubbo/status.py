"""Dubbo response status codes, result flags, and how engine errors map onto them."""

from __future__ import annotations

from enum import IntEnum

from metaprotocol_sdk import ErrorType


class Status(IntEnum):
    """The header's status byte in responses (``org.apache.dubbo.remoting.exchange.Response``)."""

    OK = 20
    CLIENT_TIMEOUT = 30
    SERVER_TIMEOUT = 31
    BAD_REQUEST = 40
    BAD_RESPONSE = 50
    SERVICE_NOT_FOUND = 60
    SERVICE_ERROR = 70
    SERVER_ERROR = 80
    CLIENT_ERROR = 90
    SERVER_THREADPOOL_EXHAUSTED_ERROR = 100


class ResultFlag(IntEnum):
    """The first value of an OK response body: what follows it."""

    RESPONSE_WITH_EXCEPTION = 0
    RESPONSE_VALUE = 1
    RESPONSE_NULL_VALUE = 2
    RESPONSE_WITH_EXCEPTION_WITH_ATTACHMENTS = 3
    RESPONSE_VALUE_WITH_ATTACHMENTS = 4
    RESPONSE_NULL_VALUE_WITH_ATTACHMENTS = 5

    @property
    def has_value(self) -> bool:
        """True when a value (result or exception) follows the flag."""
        return self not in (
            ResultFlag.RESPONSE_NULL_VALUE,
            ResultFlag.RESPONSE_NULL_VALUE_WITH_ATTACHMENTS,
        )

    @property
    def has_attachments(self) -> bool:
        """True for the flags (3..5) that end the body with an attachments map."""
        return self >= 3

    @property
    def with_attachments(self) -> ResultFlag:
        """The flag carrying the same value plus attachments (0..2 -> 3..5)."""
        return self if self >= 3 else ResultFlag(self + 3)

    @property
    def is_exception(self) -> bool:
        """True when the value is an exception thrown by the service."""
        return self in (
            ResultFlag.RESPONSE_WITH_EXCEPTION,
            ResultFlag.RESPONSE_WITH_EXCEPTION_WITH_ATTACHMENTS,
        )


#: Status of the error reply :meth:`DubboCodec.on_error` sends for each engine error.
#: Chosen so a Java consumer raises the closest ``RpcException`` kind: routing failures are
#: "service not found", an unreachable or failing upstream is a server error, a local rate
#: limit is a thread-pool exhaustion (Dubbo's own overload signal), timeouts are server
#: timeouts, a request the engine could not accept is a bad request, and an upstream reply the
#: engine could not parse is a bad response.
ERROR_STATUS: dict[ErrorType, Status] = {
    ErrorType.RouteNotFound: Status.SERVICE_NOT_FOUND,
    ErrorType.ClusterNotFound: Status.SERVICE_NOT_FOUND,
    ErrorType.NoHealthyUpstream: Status.SERVICE_ERROR,
    ErrorType.BadResponse: Status.BAD_RESPONSE,
    ErrorType.Unspecified: Status.SERVER_ERROR,
    ErrorType.OverLimit: Status.SERVER_THREADPOOL_EXHAUSTED_ERROR,
    ErrorType.Timeout: Status.SERVER_TIMEOUT,
    ErrorType.UpstreamConnectFailure: Status.SERVICE_ERROR,
    ErrorType.UpstreamReset: Status.SERVER_ERROR,
    ErrorType.BadRequest: Status.BAD_REQUEST,
    ErrorType.ShuttingDown: Status.SERVICE_ERROR,
    ErrorType.PermissionDenied: Status.BAD_REQUEST,
}


def error_status(error_type: ErrorType) -> Status:
    """The Dubbo status for an engine error (``SERVER_ERROR`` for anything unmapped)."""
    return ERROR_STATUS.get(error_type, Status.SERVER_ERROR)
