"""Dubbo reference codec (Hessian 2.0 serialization) for the MetaProtocol codec SDK."""

from metaprotocol_sdk import compiled

from .codec import DubboCodec, heartbeat_request
from .status import ERROR_STATUS, ResultFlag, Status, error_status

#: The modules of this package that run compiled (mypyc); ``()`` for a pure install.
COMPILED: tuple[str, ...] = compiled(__name__)

__all__ = [
    "COMPILED",
    "ERROR_STATUS",
    "DubboCodec",
    "ResultFlag",
    "Status",
    "error_status",
    "heartbeat_request",
]
