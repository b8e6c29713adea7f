"""The one error the Hessian 2.0 serializer raises on bad input."""

from __future__ import annotations

from metaprotocol_sdk.errors import FramingError


class HessianError(FramingError):
    """Bytes that are not valid Hessian 2.0, or a value that cannot be written as Hessian 2.0.

    A :class:`~metaprotocol_sdk.errors.FramingError` (so a ``CodecError``): ``reason`` says what
    was wrong and ``offset`` is the byte offset, in the buffer given to the
    :class:`~metaprotocol_dubbo.hessian2.Decoder`, of the value (or byte) at fault. Encoding
    errors carry ``offset=None``.
    """
