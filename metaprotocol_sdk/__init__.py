"""MetaProtocol codec SDK: typed sans-IO codecs, a conformance kit and a protocol-free proxy."""

from .codec import (
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    Capabilities,
    Codec,
    Encoded,
    LocalError,
    NeedData,
    ReplyHead,
    buffers_of,
    join_encoded,
    take_frame,
)
from .compilation import compiled
from .enums import ErrorType, MessageType, ResponseStatus, StreamType
from .errors import (
    CodecError,
    CodecLoadError,
    ConfigError,
    FrameTooLargeError,
    FramingError,
    MetaProtocolError,
    MutationError,
    RegistryError,
    UnknownCodecError,
    UnsupportedError,
)
from .header import HeaderLayout, compile_header
from .metadata import EMPTY_MUTATION, Attributes, Metadata, Mutation, key_collision

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "EMPTY_MUTATION",
    "NEED_DATA",
    "Attributes",
    "Capabilities",
    "Codec",
    "CodecError",
    "CodecLoadError",
    "ConfigError",
    "Encoded",
    "ErrorType",
    "FrameTooLargeError",
    "FramingError",
    "HeaderLayout",
    "LocalError",
    "MessageType",
    "MetaProtocolError",
    "Metadata",
    "Mutation",
    "MutationError",
    "NeedData",
    "RegistryError",
    "ReplyHead",
    "ResponseStatus",
    "StreamType",
    "UnknownCodecError",
    "UnsupportedError",
    "__version__",
    "buffers_of",
    "compile_header",
    "compiled",
    "join_encoded",
    "key_collision",
    "take_frame",
]
