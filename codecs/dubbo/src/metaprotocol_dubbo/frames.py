"""Build complete Dubbo frames (for tests, benchmarks, tools and the conformance kit)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .header import FLAG_REQUEST, FLAG_TWOWAY, HESSIAN2, build_header
from .hessian2 import Encoder
from .status import ResultFlag, Status

#: Default Dubbo protocol version written in request bodies.
DUBBO_VERSION = "2.0.2"


def descriptor_of(value: Any) -> str:
    """The JVM descriptor Dubbo writes for an argument of this Python type."""
    if isinstance(value, bool):
        return "Z"
    if isinstance(value, int):
        return "I" if -(2**31) <= value < 2**31 else "J"
    if isinstance(value, float):
        return "D"
    if isinstance(value, str):
        return "Ljava/lang/String;"
    if isinstance(value, Mapping):
        return "Ljava/util/Map;"
    if isinstance(value, (list, tuple)):
        return "Ljava/util/List;"
    return "Ljava/lang/Object;"


def build_request(
    path: str,
    method: str,
    args: Sequence[Any] = (),
    *,
    request_id: int = 1,
    version: str = "",
    attachments: Mapping[Any, Any] | None = None,
    descriptor: str | None = None,
    dubbo_version: str = DUBBO_VERSION,
    two_way: bool = True,
) -> bytes:
    """A Hessian 2.0 Dubbo request frame calling ``path#method(args)``."""
    encoder = Encoder()
    desc = "".join(descriptor_of(a) for a in args) if descriptor is None else descriptor
    for text in (dubbo_version, path, version, method, desc):
        encoder.write(text)
    for arg in args:
        encoder.write(arg)
    # A dict (or TypedMap) is written as given; other mappings as a plain map.
    encoder.write(attachments if isinstance(attachments, dict) else dict(attachments or {}))
    body = encoder.getvalue()
    flag = FLAG_REQUEST | HESSIAN2 | (FLAG_TWOWAY if two_way else 0)
    return build_header(flag, 0, request_id, len(body)) + body


def build_response(
    value: Any = None,
    *,
    request_id: int = 1,
    result_flag: ResultFlag | int | None = None,
    attachments: Mapping[Any, Any] | None = None,
    status: Status | int = Status.OK,
    error_message: str = "error",
) -> bytes:
    """A Hessian 2.0 Dubbo response frame.

    For an OK status the body is the result flag (chosen from ``value`` and ``attachments``
    when not given), the value and the attachments; for any other status it is
    ``error_message`` as a Hessian string.
    """
    encoder = Encoder()
    if status != Status.OK:
        encoder.write(error_message)
    else:
        if result_flag is None:
            result_flag = (
                ResultFlag.RESPONSE_NULL_VALUE if value is None else ResultFlag.RESPONSE_VALUE
            )
            if attachments is not None:
                result_flag = result_flag.with_attachments
        flag = ResultFlag(result_flag)
        encoder.write(int(flag))
        if flag.has_value:
            encoder.write(value)
        if flag.has_attachments:
            encoder.write(dict(attachments or {}))
    body = encoder.getvalue()
    return build_header(HESSIAN2, int(status), request_id, len(body)) + body
