"""Dubbo reference codec (Hessian 2.0 serialization) for the MetaProtocol codec SDK."""

from .codec import DubboCodec, heartbeat_request
from .status import ERROR_STATUS, ResultFlag, Status, error_status

__all__ = [
    "ERROR_STATUS",
    "DubboCodec",
    "ResultFlag",
    "Status",
    "error_status",
    "heartbeat_request",
]
