"""Thrift reference codec for the MetaProtocol codec SDK."""

from metaprotocol_sdk import compiled

from .codec import ThriftCodec
from .state import WireState

#: The modules of this package that run compiled (mypyc); ``()`` for a pure install.
COMPILED: tuple[str, ...] = compiled(__name__)

__all__ = ["COMPILED", "ThriftCodec", "WireState"]
