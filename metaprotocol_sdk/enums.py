"""Enumerations shared by codecs and engines, numbered as Aeraki MetaProtocol numbers them."""

from __future__ import annotations

from enum import IntEnum


class MessageType(IntEnum):
    """What kind of message a frame carries (Aeraki's ``MessageType``, same names and numbers)."""

    Request = 0
    Response = 1
    Oneway = 2
    Stream_Init = 3
    Stream_Data = 4
    Stream_Close_One_Way = 5
    Stream_Close_Two_Way = 6
    Heartbeat = 7
    Error = 8

    @property
    def is_request_side(self) -> bool:
        """True for messages a client sends that the engine must route."""
        return self in _REQUEST_SIDE


_REQUEST_SIDE = frozenset({MessageType.Request, MessageType.Oneway, MessageType.Stream_Init})


class StreamType(IntEnum):
    """Shape of the exchange a message belongs to."""

    Unary = 0
    ClientStream = 1
    ServerStream = 2
    BidiStream = 3


class ErrorType(IntEnum):
    """Why the engine answers locally; passed to :meth:`Codec.on_error`.

    The first six keep Aeraki's names and numbers; the rest are what a real engine also needs.
    """

    RouteNotFound = 0
    ClusterNotFound = 1
    NoHealthyUpstream = 2
    BadResponse = 3
    Unspecified = 4
    OverLimit = 5
    Timeout = 6
    UpstreamConnectFailure = 7
    UpstreamReset = 8
    BadRequest = 9
    ShuttingDown = 10
    #: An AuthorizationPolicy denied the request (Envoy's ``RBAC: access denied``).
    PermissionDenied = 11


class ResponseStatus(IntEnum):
    """Protocol-independent outcome of a response, used for stats and access logs."""

    Unknown = 0
    Ok = 1
    Error = 2
