"""Helpers shared by the checks: guarded decode calls, sample iteration, hypothesis runs."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import PurePath
from typing import Any, NoReturn, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaprotocol_sdk.codec import Codec, Encoded, NeedData, join_encoded
from metaprotocol_sdk.enums import MessageType, ResponseStatus, StreamType
from metaprotocol_sdk.errors import CodecError
from metaprotocol_sdk.metadata import Attributes, Metadata
from metaprotocol_sdk.testing.golden import Sample, mismatches
from metaprotocol_sdk.testing.hexdump import compare, hexdump

from .base import CheckContext, CheckFailed, CheckSkipped

T = TypeVar("T")


#: Frames of a stream: the engine sends each stream on an upstream connection of its own and
#: never rewrites their ids (a codec may carry the stream id in the request id's field).
STREAM_FRAMES = (
    MessageType.Stream_Init,
    MessageType.Stream_Data,
    MessageType.Stream_Close_One_Way,
    MessageType.Stream_Close_Two_Way,
)


def fail(message: str) -> NoReturn:
    """Raise :class:`CheckFailed`."""
    raise CheckFailed(message)


def raised_at(exc: BaseException, codec: object) -> str:
    """Where ``exc`` was raised, as `` (raised at FILE:LINE in FUNCTION: SOURCE)``.

    ``exc`` is as caught where the codec's method was called: the first frame of its
    traceback is that caller's, and is never named. The deepest frame in the codec's own
    package (or module) is named, not that of a library it called: that is the line its
    author has to change. Without one, the deepest frame below the call.

    A compiled codec (mypyc) has frames too, in the versions that add them to tracebacks,
    but their file is the path its build was given (``src/pkg/codec.py``): it is named from
    the package on, without a source line (read relative to the current directory, the line
    could be that of another file). Without any frame below the call (an older mypyc, a C
    extension, a builtin), the codec's module is named instead: never the caller's line.
    """
    frames = traceback.extract_tb(exc.__traceback__)[1:]
    name = type(codec).__module__
    if not frames:
        if _is_extension(getattr(sys.modules.get(name), "__file__", None)):
            where = f"the compiled module {name}"
        else:
            where = f"C code that {type(codec).__qualname__} of {name} called"
        return f" (raised in {where}: no Python frame says which line)"
    own = _own_line(frames, name)
    if own is not None:
        return own
    frame = frames[-1]
    if os.path.isabs(frame.filename):
        line = f": {frame.line.strip()}" if frame.line else ""
        return f" (raised at {frame.filename}:{frame.lineno} in {frame.name}{line})"
    return f" (raised at {frame.filename}:{frame.lineno} in {frame.name}, in compiled code)"


def codec_line(exc: BaseException, codec: type[Codec]) -> str | None:
    """`` (raised at FILE:LINE ...)`` for the deepest frame of ``exc``'s traceback in the
    package (or module) of ``codec``, or ``None`` when no frame is there (the exception did not
    come from the codec's own code)."""
    return _own_line(traceback.extract_tb(exc.__traceback__), codec.__module__)


def _own_line(frames: Sequence[traceback.FrameSummary], name: str) -> str | None:
    """The deepest of ``frames`` in the codec module ``name``'s package, as ``raised_at``
    names it (a compiled codec's by its build path), or ``None``."""
    top_name = name.partition(".")[0]
    roots = _package_roots(name)
    for frame in reversed(frames):
        for root in roots:
            if frame.filename == root or frame.filename.startswith(root + os.sep):
                where = os.path.relpath(frame.filename, os.path.dirname(root))
                line = f": {frame.line.strip()}" if frame.line else ""
                return f" (raised at {where}:{frame.lineno} in {frame.name}{line})"
        if os.path.isabs(frame.filename) and os.path.exists(frame.filename):
            continue  # a real file outside the codec's package: a library it called
        built = _built_path(frame.filename, top_name)
        if built is not None:  # the codec's own code, compiled from a copy of its source
            return f" (raised at {built}:{frame.lineno} in {frame.name}, in compiled code)"
    return None


def _package_roots(name: str) -> list[str]:
    """Where the codec's own code lives: the directory of the top-level package of module
    ``name``, found from that module's file (not from ``sys.modules`` by the package's name,
    which another project's package of the same name, say ``tests``, may hold); a lone
    module's file itself; a namespace package's directories."""
    parts = name.split(".")
    file = getattr(sys.modules.get(name), "__file__", None)
    if file is None:
        top = sys.modules.get(parts[0])
        return [str(path) for path in getattr(top, "__path__", ())]
    path = PurePath(os.path.abspath(file))
    module = path.parent if path.stem == "__init__" else path.with_suffix("")
    if len(parts) == 1:
        return [str(module) if path.stem == "__init__" else str(path)]
    return [str(module.parents[len(parts) - 2])]


def _is_extension(file: str | None) -> bool:
    return file is not None and file.endswith(tuple(EXTENSION_SUFFIXES))


def _built_path(filename: str, top: str) -> str | None:
    """``filename`` from the package ``top`` on (``pkg/codec.py`` for a build's
    ``src/pkg/codec.py``; ``top.py`` for a lone module), or ``None`` if it is not in it."""
    parts = PurePath(filename).parts
    if top in parts[:-1]:
        return "/".join(parts[parts.index(top) :])
    if parts and parts[-1] == f"{top}.py":
        return parts[-1]
    return None


class DecodeTimeout(BaseException):
    """A codec call ran past the kit's time limit (BaseException so codecs cannot swallow it)."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (main thread, POSIX); elsewhere measure only."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        start = time.perf_counter()
        yield
        if seconds is not None and time.perf_counter() - start > seconds:
            raise DecodeTimeout
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise DecodeTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds or 0.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def call_decode(
    codec: Codec, buffer: bytearray, *, limit: float | None = None
) -> Metadata | NeedData:
    """``codec.decode(buffer)`` with the contract's invariants enforced.

    A :class:`CodecError` propagates. Any other exception, a timeout, a wrong return type, a
    ``NeedData`` that changed the buffer or that cannot be satisfied within
    ``max_frame_size``, or a message that is not exactly the bytes consumed, fails the check.
    """
    before = bytes(buffer)
    try:
        with time_limit(limit):
            result = codec.decode(buffer)
    except CodecError:
        # Errors consume nothing too, but bad_input_consumes_nothing alone checks that, so a
        # codec with that one fault fails that one check, not every check that provokes errors.
        raise
    except DecodeTimeout:
        fail(f"decode took longer than {limit}s on input:\n{hexdump(before)}")
    except Exception as exc:
        fail(
            f"decode raised {type(exc).__name__}: {exc}{raised_at(exc, codec)} (only "
            f"CodecError subclasses may escape decode) on input:\n{hexdump(before)}"
        )
    if isinstance(result, NeedData):
        if bytes(buffer) != before:
            fail(
                "decode returned NeedData but changed the buffer (it must consume nothing; "
                "partial data stays for the next call)\n"
                f"input:\n{hexdump(before)}\nbuffer after:\n{hexdump(buffer)}"
            )
        limit_size = codec.max_frame_size
        if result.needed > limit_size:
            fail(
                f"decode returned NeedData(needed={result.needed}) above max_frame_size="
                f"{limit_size}: it is buffering an oversized length instead of raising "
                f"FrameTooLargeError\ninput:\n{hexdump(before)}"
            )
        if len(before) >= limit_size:
            fail(
                f"decode returned NeedData with {len(before)} bytes buffered, at or above "
                f"max_frame_size={limit_size}: no frame within the limit can still be "
                f"incomplete, so this is unbounded buffering\ninput:\n{hexdump(before)}"
            )
        if result.needed and result.needed <= len(before):
            fail(
                f"decode returned NeedData(needed={result.needed}) but the buffer already "
                f"holds {len(before)} bytes: needed is the size of the whole first frame, "
                "counted from its first byte (length field and header included), or 0 while "
                f"that size is not known yet\ninput:\n{hexdump(before)}"
            )
        return result
    if not isinstance(result, Metadata):
        fail(f"decode returned {type(result).__name__}, not Metadata or NeedData")
    consumed = len(before) - len(buffer)
    if result.frame != before[:consumed] or bytes(buffer) != before[consumed:]:
        # The likeliest slip: the frame copied out of the buffer and left in it too.
        hint = " (take_frame(buffer, size) removes it and returns it)" if consumed == 0 else ""
        fail(
            f"decode must consume exactly the message it returns: it consumed {consumed} "
            f"bytes but metadata.frame holds {len(result.frame)}{hint}\ninput:\n"
            f"{hexdump(before)}\nmetadata.frame:\n{hexdump(result.frame)}"
        )
    if (
        result.header_size < 0
        or result.body_size < 0
        or (result.header_size + result.body_size > result.size)
    ):
        fail(
            f"header_size={result.header_size} + body_size={result.body_size} do not fit in "
            f"the {result.size}-byte frame\nframe:\n{hexdump(result.frame)}"
        )
    wrong = type_problems(result)
    if wrong:
        fail(
            "decode returned metadata whose fields do not have the contract's types: "
            + "; ".join(wrong)
            + " (an engine's route matcher, balancer and rate limits read them as such, so "
            f"a message like this raises in the middle of a client's read)\ninput:\n"
            f"{hexdump(before)}"
        )
    return result


def type_problems(message: Metadata) -> list[str]:
    """Where ``message`` breaks the types the contract gives its fields (empty when it keeps
    them): an engine routes, balances and limits on them without looking again."""
    problems = []
    for name, kind in _FIELD_TYPES:
        value = getattr(message, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"{name} is {type(value).__name__}, not {kind.__name__}")
    attributes = message.attributes
    if not isinstance(attributes, Attributes):
        problems.append(f"attributes is {type(attributes).__name__}, not Attributes")
        return problems
    for folded, (key, value) in attributes.folded_items.items():
        if not isinstance(key, str) or not isinstance(value, str):
            problems.append(
                f"attribute {key!r} = {value!r} is {type(key).__name__} = "
                f"{type(value).__name__}, not str = str"
            )
        elif folded != key.lower():
            problems.append(
                f"attribute {key!r} is filed under {folded!r}, not its lower case "
                f"{key.lower()!r} (the engine matches routes on the folded key)"
            )
        if len(problems) > 3:
            break
    return problems


_FIELD_TYPES: tuple[tuple[str, type], ...] = (
    ("message_type", MessageType),
    ("request_id", int),
    ("operation_name", str),
    ("stream_type", StreamType),
    ("stream_id", int),
    ("response_status", ResponseStatus),
    ("header_size", int),
    ("body_size", int),
)


def decode_whole(codec: Codec, data: bytes, what: str = "a complete message") -> Metadata:
    """Decode ``data`` that must be exactly one message; fail otherwise."""
    buffer = bytearray(data)
    try:
        result = call_decode(codec, buffer)
    except CodecError as exc:
        fail(
            f"decode raised {type(exc).__name__}: {exc} on {what}:\n"
            + hexdump(data, mark=exc.offset)
        )
    if isinstance(result, NeedData):
        fail(f"decode returned {result!r} for {what} of {len(data)} bytes:\n{hexdump(data)}")
    if buffer:
        fail(
            f"decode consumed {result.size} of the {len(data)} bytes of {what}; "
            f"{len(buffer)} bytes were left:\n{hexdump(data, mark=result.size)}"
        )
    return result


def encode_bytes(codec: Codec, call: Callable[[], Encoded], what: str) -> bytes:
    """Run an encode call and flatten its result; non-CodecError exceptions fail the check."""
    try:
        return join_encoded(call())
    except CodecError:
        raise
    except Exception as exc:
        fail(f"{what} raised {type(exc).__name__}: {exc}")


def same_metadata(expected: Metadata, actual: Metadata, *, ignore: tuple[str, ...] = ()) -> str:
    """Empty when both decode to the same summary, else the differing fields."""
    a, b = expected.to_dict(), actual.to_dict()
    diffs = [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if k not in ignore and a[k] != b.get(k)]
    return "; ".join(diffs)


def labelled(sample: Sample, prop: Callable[[Sample], None]) -> None:
    """Run ``prop`` on ``sample``, adding the sample's name and bytes to a failure."""
    try:
        prop(sample)
    except CheckFailed as exc:
        raise CheckFailed(f"{sample.label}: {exc}\nmessage:\n{hexdump(sample.frame)}") from None


def run_property(
    ctx: CheckContext, strategy: st.SearchStrategy[T], test: Callable[[T], None], examples: int
) -> None:
    """Run ``test`` over hypothesis examples with the kit's deterministic settings."""
    conf = ctx.target.settings

    @settings(
        max_examples=examples,
        derandomize=conf.derandomize,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
    )
    @given(strategy)
    def run(value: T) -> None:
        test(value)

    run()


def no_messages() -> NoReturn:
    """Skip: there is nothing valid to drive the codec with."""
    raise CheckSkipped(
        "no valid messages: the codec ships no golden vectors and no message strategy"
    )


def for_each_sample(ctx: CheckContext, prop: Callable[[Sample], None]) -> None:
    """Run ``prop`` on every golden vector, then on generated messages."""
    target = ctx.target
    if not target.samples and target.messages is None:
        no_messages()
    for sample in target.samples:
        labelled(sample, prop)
    if target.messages is not None:
        run_property(ctx, target.messages, lambda s: labelled(s, prop), target.settings.examples)


def collect(ctx: CheckContext, count: int) -> list[Sample]:
    """Golden samples plus ``count`` generated ones (deterministic under derandomize)."""
    found = list(ctx.target.samples)
    if ctx.target.messages is not None:
        run_property(ctx, ctx.target.messages, found.append, count)
    return found


#: How many leading bytes of a frame the corruption sweeps and the length-field search visit.
HEAD = 64


def corruptions(frame: bytes) -> list[tuple[int, bytes]]:
    """``frame`` with each of its first :data:`HEAD` bytes set to 00/ff/80/7f or flipped:
    ``(offset, corrupted frame)`` pairs."""
    out = []
    for pos in range(min(len(frame), HEAD)):
        for value in {0x00, 0xFF, 0x80, 0x7F, frame[pos] ^ 0x01} - {frame[pos]}:
            out.append((pos, frame[:pos] + bytes((value,)) + frame[pos + 1 :]))
    return out


def split_points(size: int, most: int) -> list[int]:
    """Split offsets 1..size-1, sampled (head, tail and a stride) for long frames."""
    if size - 1 <= most:
        return list(range(1, size))
    edge = most // 4
    stride = max(1, (size - 2 * edge) // (most // 2))
    middle = range(edge, size - edge, stride)
    return sorted({*range(1, edge), *middle, *range(size - edge, size)})


def reference(ctx: CheckContext, sample: Sample) -> Metadata:
    """The sample decoded whole by a fresh codec."""
    return decode_whole(ctx.target.new_codec(sample.options), sample.frame)


def check_expectations(metadata: Metadata, sample: Sample) -> None:
    """Fail when ``metadata`` does not match the sample's ``expect``."""
    problems = mismatches(metadata, sample.expect)
    if problems:
        fail("decoded metadata does not match expect: " + "; ".join(problems))


__all__ = [
    "call_decode",
    "check_expectations",
    "collect",
    "compare",
    "decode_whole",
    "encode_bytes",
    "fail",
    "for_each_sample",
    "labelled",
    "reference",
    "run_property",
    "same_metadata",
    "split_points",
    "time_limit",
    "type_problems",
]


def defining_class(codec_type: type[Codec], name: str) -> type:
    """The class of ``codec_type``'s MRO that defines ``name`` (where a capability's method,
    or the ``capabilities`` that declare it, are written)."""
    return next(klass for klass in codec_type.__mro__ if name in vars(klass))
