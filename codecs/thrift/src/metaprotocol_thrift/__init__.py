"""Thrift reference codec for the MetaProtocol codec SDK."""

from .codec import ThriftCodec
from .state import WireState

__all__ = ["ThriftCodec", "WireState"]
