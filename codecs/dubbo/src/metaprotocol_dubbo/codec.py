"""The Dubbo codec: Dubbo frames (Hessian 2.0 bodies) to MetaProtocol metadata and back."""

from __future__ import annotations

import struct
import sys
from collections.abc import Set as AbstractSet
from functools import partial
from typing import Any

from metaprotocol_sdk import (
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    Attributes,
    Capabilities,
    Codec,
    CodecError,
    ConfigError,
    Encoded,
    FrameTooLargeError,
    FramingError,
    LocalError,
    MessageType,
    Metadata,
    Mutation,
    MutationError,
    NeedData,
    ReplyHead,
    ResponseStatus,
    StreamType,
    UnsupportedError,
    key_collision,
)

from .body import (
    COMPACT_INT_ZERO,
    TAG_NULL,
    Attachments,
    KnownHead,
    NewDecoder,
    encode_string,
    encode_string_map,
    fold_mutation,
    merge_strings,
    parameter_count,
    read_attachments,
    read_string,
    rewrite_map,
    scan_request,
    scan_strings,
    skip_compact_strings,
    skip_values,
)
from .header import (
    BODY_LENGTH_OFFSET,
    FLAG_EVENT,
    FLAG_REQUEST,
    FLAG_TWOWAY,
    HEADER,
    HEADER_SIZE,
    HEADER_STRUCT,
    HESSIAN2,
    MAGIC,
    SERIALIZATION_MASK,
    build_header,
    serialization_name,
)
from .hessian2 import DEFAULT_MAX_CLASSES, DEFAULT_MAX_REFS, Decoder
from .status import ResultFlag, Status, error_status

#: Default ``max_hessian_items``: far more attachments than any real request carries, and at
#: most a few MB of Python objects however the 8 MiB of a frame are spent.
DEFAULT_MAX_HESSIAN_ITEMS = 65536

_FRONT_ID = struct.Struct(">4sQ").pack  # a header's magic, flag and status, then a request id
_ID_LENGTH = struct.Struct(">Qi")  # the header's request id and body length, packed together
#: How many distinct request heads (service + method) a codec recognises without re-parsing,
#: and the longest head (five strings, in bytes) it remembers.
_HEAD_CACHE_SIZE = 8
_HEAD_BYTES_MAX = 512
#: How many distinct attachment maps per head are recognised by their bytes, and the longest
#: map remembered. With the head bounds: at most 8 x (512 + 8 x 1024) = 68 KiB of wire bytes
#: per codec (one connection), plus their parsed entries.
_MAP_CACHE_SIZE = 8
_MAP_BYTES_MAX = 1024
#: Misses in a row after which a head stops looking its maps up: a map with a per-request
#: value (a trace id, say) never repeats, and then the lookup would only cost time.
_MAP_MISSES_LIMIT = 64
#: What _request builds a request's Metadata from: attachments, argument offset and count,
#: method, attributes and values.
_Request = tuple[Attachments, int, int, str, Attributes, dict[str, Any]]


class _Head(KnownHead):
    """A request head seen recently, and the attachment maps seen after it."""

    __slots__ = ("maps", "misses")

    def __init__(self, strings: list[str], arg_count: int, length: int) -> None:
        self.strings = strings  # as KnownHead.__init__ does, without the call
        self.arg_count = arg_count
        self.length = length
        #: Parsed maps by their bytes; None once lookups stopped paying off.
        self.maps: dict[bytes, KnownRequest] | None = {}
        self.misses = 0

    def miss(self) -> None:
        """A map was not in the table."""
        self.misses += 1
        if self.misses >= _MAP_MISSES_LIMIT:
            self.maps = None


_LENGTH = struct.Struct(">i")
_HEADER_FIELDS = HEADER_STRUCT.unpack_from  # checked by hand: magic, then lengths
_PACK_HEADER = HEADER_STRUCT.pack
_NULL_BODY = b"N"
_OK = Status.OK.value

#: Exceptions a malformed body can provoke in inline parsing; turned into FramingError.
_PARSE_ERRORS = (IndexError, ValueError, TypeError, KeyError, RecursionError, OverflowError)


class RequestState:
    """What :class:`DubboCodec` keeps about a decoded request to re-encode it."""

    __slots__ = ("args", "attachments", "flag")

    def __init__(
        self, flag: int, attachments: Attachments | None, args: tuple[int, int] = (0, 0)
    ) -> None:
        self.flag = flag
        self.attachments = attachments
        #: (offset, count) of the arguments, replayed when non-string attachments are rewritten.
        self.args = args


class KnownRequest:
    """The state of every request whose head and attachments map were both seen before.

    Nothing in it depends on the frame, so one instance serves all such requests: the map (an
    untyped Hessian map of strings) ends the frame and is ``map_size`` bytes long, the
    arguments are ``args`` (offset, count). ``folded`` and ``values`` are the templates each
    message copies. ``folded_keys`` holds the attachment keys lower-cased (a mutation that names
    none of them ignoring case only adds entries). :meth:`state` gives the
    :class:`RequestState` of one frame.
    """

    __slots__ = ("args", "folded", "folded_keys", "map_size", "method", "strings", "values")

    def __init__(
        self,
        method: str,
        strings: dict[str, str],
        folded: dict[str, tuple[str, str]],
        values: dict[str, Any],
        args: tuple[int, int],
        map_size: int,
    ) -> None:
        self.method = method
        self.strings = strings
        self.folded = folded
        self.values = values
        self.args = args
        self.map_size = map_size
        self.folded_keys = frozenset(key.lower() for key in strings)

    def state(self, frame: bytes) -> RequestState:
        """The full state of ``frame``, a request this state was shared with."""
        end = len(frame)
        attachments = Attachments(self.strings, None, end - self.map_size, end)
        return RequestState(frame[2], attachments, self.args)


class ResponseState:
    """What :class:`DubboCodec` keeps about a decoded response to re-encode it.

    ``result_flag`` is ``None`` for error statuses and events, and for the body that
    dubbo-remoting writes for a null result (a bare Hessian null, no flag). ``value_start`` and
    ``value_end`` delimit the bytes after the flag up to the attachments (if any);
    ``value_end`` is :data:`TO_END` when the value runs to the end of the frame, so that a state
    does not depend on the frame's length and can be shared.
    """

    __slots__ = ("attachments", "flag", "result_flag", "status", "value_end", "value_start")

    def __init__(
        self,
        flag: int,
        status: int,
        result_flag: ResultFlag | None,
        value_start: int,
        value_end: int,
        attachments: Attachments | None,
    ) -> None:
        self.flag = flag
        self.status = status
        self.result_flag = result_flag
        self.value_start = value_start
        self.value_end = value_end
        self.attachments = attachments


#: ``value_end`` of a value that runs to the end of the frame (slices clamp it).
TO_END = sys.maxsize

#: result flag -> (flag, has a value, has attachments, response status).
_FLAG_INFO: dict[int, tuple[ResultFlag, bool, bool, ResponseStatus]] = {
    int(f): (
        f,
        f.has_value,
        f.has_attachments,
        ResponseStatus.Error if f.is_exception else ResponseStatus.Ok,
    )
    for f in ResultFlag
}


#: What every OK response with one header flag and result flag 0..2 shares: its state,
#: response status and result flag (a plain tuple: unpacking a NamedTuple costs more).
_Plain = tuple[ResponseState, ResponseStatus, int]


class _PlainStates(dict[tuple[int, int], _Plain | None]):
    """(header flag, first body byte) -> the shared state of an OK response whose body is a
    one-byte result flag 0..2 and a value to the end; ``None`` for any other first byte, and
    for a header flag of a request, an event or another serialization than Hessian 2."""

    def __missing__(self, key: tuple[int, int]) -> _Plain | None:
        flag, tag = key
        raw_flag = tag - COMPACT_INT_ZERO
        if not 0 <= raw_flag <= 2:  # not one of the flags without attachments
            return None
        if flag & (FLAG_REQUEST | FLAG_EVENT) or flag & SERIALIZATION_MASK != HESSIAN2:
            return None
        result_flag, _, _, response_status = _FLAG_INFO[raw_flag]
        state = ResponseState(flag, _OK, result_flag, HEADER_SIZE + 1, TO_END, None)
        plain = self[key] = (state, response_status, raw_flag)  # at most 256 flags x 3
        return plain


_PLAIN = _PlainStates()


def _front(buffer: bytearray, size: int) -> bytes:
    """A copy of the first ``size`` bytes of ``buffer``, which keeps them (one copy). For a
    buffer that holds more than the frame: ``decode`` copies one that holds just the frame
    (the usual case) itself, without this call."""
    with memoryview(buffer) as view:
        return view[:size].tobytes()


#: What _event, _request and _response give decode to build a Metadata from: message type,
#: operation name, response status, attributes, codec state and values.
_Parts = tuple[
    MessageType,
    str,
    ResponseStatus,
    Attributes,
    "RequestState | ResponseState | KnownRequest",
    dict[str, Any],
]


def _partial(flag: int, status: int, request_id: int) -> Metadata:
    """What an error can tell of its frame from the header alone: message type and id."""
    return Metadata(_message_type(flag, status), request_id=request_id)


def _message_type(flag: int, status: int) -> MessageType:
    if flag & FLAG_EVENT:
        return MessageType.Heartbeat
    if flag & FLAG_REQUEST:
        return MessageType.Request if flag & FLAG_TWOWAY else MessageType.Oneway
    return MessageType.Response if status == _OK else MessageType.Error


_REQUEST = MessageType.Request
_ONEWAY = MessageType.Oneway
_RESPONSE = MessageType.Response
_UNKNOWN = ResponseStatus.Unknown
_UNARY = StreamType.Unary
_folded = Attributes.from_folded  # bound once: the hot paths skip the class attribute lookup

_TAG_MAP_UNTYPED = 0x48  # 'H'
_TAG_END = 0x5A  # 'Z'

#: Frames up to this size are scanned inline as latin-1 text; larger ones are not copied.
_INLINE_SCAN_LIMIT = 64 * 1024
#: Mutated requests up to this size are written as one new frame; larger ones as buffers
#: whose arguments are a zero-copy slice of the original.
_COPY_LIMIT = 16 * 1024


#: A request mutation as Hessian string pairs plus the map end 'Z', and folded
#: (:func:`~metaprotocol_dubbo.body.fold_mutation`, what the pairs were written from).
_Added = tuple[bytes, dict[str, tuple[str, str]]]

#: Encoded pairs by mutation items: a route applies the same mutation to every request.
_ADDED_PAIRS: dict[tuple[tuple[str, str], ...], _Added] = {}
_ADDED_PAIRS_SIZE = 64


def _encode_added(mutation: Mutation) -> _Added:
    folded = fold_mutation(mutation)
    return encode_string_map(dict(folded.values()))[1:], folded  # without the map's 'H'


def _added_pairs(mutation: Mutation) -> _Added:
    """``mutation`` of a request as Hessian string pairs plus the map end 'Z' (to splice into
    a map), and folded (of two keys equal ignoring case, the last is written). A mutation
    naming ``method`` is refused (:func:`_refuse_method`) before it is encoded, so only
    mutations that passed are cached: a hit needs no check."""
    try:
        key = tuple(mutation.items())
        added = _ADDED_PAIRS.get(key)
    except TypeError:  # an unhashable value: encode_string_map reports it
        _refuse_method(mutation)
        return _encode_added(mutation)
    if added is None:
        _refuse_method(mutation)
        added = _encode_added(mutation)
        if len(_ADDED_PAIRS) >= _ADDED_PAIRS_SIZE:
            _ADDED_PAIRS.clear()
        _ADDED_PAIRS[key] = added
    return added


def _positive(name: str, value: object) -> int:
    """An option that must be a positive integer (config values may be strings)."""
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        number = 0
    if isinstance(number, bool) or number <= 0:
        raise ConfigError(f"must be a positive integer; got {value!r}", field=name)
    return number


def _check_value_ends_frame(frame: bytes, state: ResponseState, new_decoder: NewDecoder) -> None:
    """Refuse (MutationError) to append attachments to a response whose value (one Hessian
    value after a flag 0 or 1, nothing after flag 2) does not end exactly at the frame end.

    Walked only for such mutations: a plain forward never parses the value."""
    start = min(state.value_start, len(frame))
    result_flag = state.result_flag
    try:
        end = start if result_flag is None or not result_flag.has_value else None
        if end is None:
            end, _ = skip_values(frame, start, 1, new_decoder)
    except CodecError as exc:
        raise MutationError(f"the response value is malformed ({exc.reason})") from None
    if end != len(frame):
        raise MutationError(
            f"the response value ends at byte {end}, not at the frame end ({len(frame)})"
        )


def _check_keys(frame: bytes, attachments: Attachments, folded: int) -> None:
    """Refuse a request whose attachment keys collide: one key twice, or two keys equal
    ignoring case. Routing and authorization read attributes ignoring case (one of the keys
    would silently win) while the provider's ``HashMap`` holds both: an ambiguous request."""
    strings, others = attachments.strings, attachments.others
    keys: list[str] = list(strings)
    if others:  # a string key with another value type names the same attachment
        keys += [key for key in others if isinstance(key, str)]
        folded = len({key.lower() for key in keys})
    distinct = len(strings) + (len(others) if others else 0)
    if folded == len(keys) and attachments.entries <= distinct:
        return
    start = attachments.start
    reason = key_collision(keys, "attachment key")
    if reason is None:  # the keys in wire order name the one that came twice
        reason = key_collision(_wire_keys(frame[start : attachments.end]), "attachment key")
    if reason is None:
        reason = f"the attachments map holds {attachments.entries} entries for {distinct} keys"
    raise FramingError(
        f"{reason}: refused as ambiguous (routing and authorization read one value for "
        "keys equal ignoring case, the provider's map may read another)",
        offset=start,
    )


def _wire_keys(data: bytes) -> list[str]:
    """The string keys of the untyped map ``data``, in wire order (for an error message; empty
    when the map refers to what came before it, which a fresh decoder cannot read)."""
    keys: list[str] = []
    if data[:1] != b"H":
        return keys
    decoder = Decoder(data, 1)
    try:
        while data[decoder.offset] != _TAG_END:
            key = decoder.read()
            decoder.skip()
            if isinstance(key, str):
                keys.append(key)
    except (CodecError, *_PARSE_ERRORS):
        return []
    return keys


def _refuse_method(mutation: Mutation) -> None:
    """A request's method is in its body: an attachment named ``method`` would not change it
    (Dubbo and routing both read the body's), so such a mutation is refused, not dropped.
    So is an empty ``interface`` or ``version``: decode reads an empty attachment as absent
    (the body's path and version stand), so it would not blank them."""
    for key, value in mutation.items():
        folded = key.lower()
        if folded == "method":
            raise MutationError(
                "the method of a Dubbo request is in its body; a 'method' attachment would "
                "not change it"
            )
        if not value and folded in ("interface", "version"):
            raise MutationError(
                f"an empty {key!r} attachment reads as absent (the body's {folded} stands), "
                "so it cannot blank it"
            )


class DubboCodec(Codec):
    """Dubbo protocol codec (Hessian 2.0 serialization, id 2).

    Requests expose ``interface``, ``method``, ``version``, ``group`` and every string
    attachment as attributes; responses expose their string attachments. Arguments and
    results are never materialised: they travel as untouched slices of the original frame.
    """

    protocol = "dubbo"
    capabilities = Capabilities(
        heartbeat=True,
        oneway=True,
        mutation=True,
        response_mutation=True,
        rewrite_request_id=True,
        error_reply=True,
        peek_reply=True,
        drain_notice=True,
        heartbeat_request=True,
    )
    max_request_id = 0x7FFFFFFFFFFFFFFF  # Java long: Dubbo's 64-bit id is signed
    #: ``__init__``'s options (the compiled build has no signature to read them from).
    option_names = (
        "max_frame_size",
        "upgrade_result_flag",
        "max_hessian_refs",
        "max_hessian_classes",
        "max_hessian_items",
    )

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        upgrade_result_flag: bool = True,
        max_hessian_refs: int | str = DEFAULT_MAX_REFS,
        max_hessian_classes: int | str = DEFAULT_MAX_CLASSES,
        max_hessian_items: int | str = DEFAULT_MAX_HESSIAN_ITEMS,
    ) -> None:
        """``upgrade_result_flag``: write response mutations into responses with result flags
        0..2 by switching them to 3..5. Consumers older than Dubbo 2.6.3 and some non-Java
        clients only know 0..2: set it false for them, and a mutation of such a response
        raises :class:`~metaprotocol_sdk.MutationError` instead. ``max_hessian_refs`` and
        ``max_hessian_classes`` bound the lists, maps and objects and the class definitions
        of one body, ``max_hessian_items`` the list items and map entries it materialises (the
        attachments; arguments are skipped, not built), which bounds memory: a one-byte entry
        becomes a Python object (see :class:`~metaprotocol_dubbo.hessian2.Decoder`)."""
        super().__init__(max_frame_size=max_frame_size)
        self.upgrade_result_flag = upgrade_result_flag
        self.max_hessian_refs = _positive("max_hessian_refs", max_hessian_refs)
        self.max_hessian_classes = _positive("max_hessian_classes", max_hessian_classes)
        self.max_hessian_items = _positive("max_hessian_items", max_hessian_items)
        #: Makes the Hessian decoder of a body, with this codec's limits.
        self._new_decoder: NewDecoder = partial(
            Decoder,
            max_refs=self.max_hessian_refs,
            max_classes=self.max_hessian_classes,
            max_items=self.max_hessian_items,
        )
        #: Recently seen request heads, most recent first: (head bytes, what it parsed to).
        self._heads: list[tuple[bytes, _Head]] = []
        #: The request mutation last spliced, a copy of it and its pairs (see :meth:`_pairs`).
        self._mutation: Mutation | None = None
        self._mutation_copy: dict[str, str] = {}
        self._mutation_pairs: _Added = (b"", {})

    def reset(self) -> None:
        """Forget the recently seen request heads and attachment maps, and the last request
        mutation (nothing else is kept)."""
        self._heads.clear()
        self._mutation = None

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        """Consume one Dubbo frame from the front of ``buffer``, or nothing (need more data)."""
        if len(buffer) < HEADER_SIZE:
            return NEED_DATA
        magic, flag, status, request_id, body_length = _HEADER_FIELDS(buffer)
        if magic != MAGIC:
            HEADER.unpack(buffer)  # raises the header layout's error for the bad magic
        if body_length < 0:
            raise FramingError(f"negative body length {body_length}", offset=BODY_LENGTH_OFFSET)
        size = HEADER_SIZE + body_length
        if size > self.max_frame_size:
            raise FrameTooLargeError(
                size,
                self.max_frame_size,
                offset=BODY_LENGTH_OFFSET,
                metadata=_partial(flag, status, request_id),
            )
        if len(buffer) < size:
            return NeedData(size)
        # Parsed from a copy, and consumed only once parsed: an error consumes nothing.
        frame = bytes(buffer) if size == len(buffer) else _front(buffer, size)
        message = self._parse(frame, flag, status, request_id, body_length)
        del buffer[:size]
        return message

    def decode_frame(self, frame: bytes) -> Metadata:
        """Decode ``frame``, one whole frame, as :meth:`decode` would, without copying it.
        Anything but a well-formed header whose length fills ``frame`` takes the default
        path (``decode`` on a copy), so the errors are decode's own."""
        if len(frame) >= HEADER_SIZE:
            magic, flag, status, request_id, body_length = _HEADER_FIELDS(frame)
            if magic == MAGIC and HEADER_SIZE + body_length == len(frame) <= self.max_frame_size:
                return self._parse(frame, flag, status, request_id, body_length)
        return super().decode_frame(frame)

    def _parse(
        self, frame: bytes, flag: int, status: int, request_id: int, body_length: int
    ) -> Metadata:
        """The one place a decoded message's Metadata is built, from the whole ``frame``."""
        size = HEADER_SIZE + body_length
        serialization = flag & SERIALIZATION_MASK
        try:
            if serialization != HESSIAN2:
                raise UnsupportedError(
                    f"serialization id {serialization} ({serialization_name(serialization)}) "
                    "is not supported; only Hessian 2.0 (id 2) is",
                    offset=2,
                )
            if flag & FLAG_EVENT:
                parts = self._event(frame, flag, status)
            elif flag & FLAG_REQUEST:
                parts = self._request(frame, flag)
            else:
                parts = self._response(frame, flag, status, body_length)
        except CodecError as exc:
            exc.frame_size = size
            if exc.metadata is None:
                exc.metadata = _partial(flag, status, request_id)
            raise
        except _PARSE_ERRORS as exc:
            raise FramingError(
                f"malformed Hessian body: {type(exc).__name__}: {exc}",
                offset=HEADER_SIZE,
                metadata=_partial(flag, status, request_id),
                frame_size=size,
            ) from None
        message_type, operation, response_status, attributes, state, values = parts
        return Metadata(  # positional: the hot-path form
            message_type,
            frame,
            request_id,
            operation,
            HEADER_SIZE,
            body_length,
            response_status,
            attributes,
            state,
            _UNARY,
            0,
            values,
        )

    def _event(self, frame: bytes, flag: int, status: int) -> _Parts:
        # Heartbeats carry a Hessian null; other events (Dubbo's read-only "R") a string.
        # The body is not interpreted here: any event is a Heartbeat for the engine, and
        # is_drain_notice looks at the body of a short one-way event only when asked.
        state: RequestState | ResponseState
        if flag & FLAG_REQUEST:
            response_status = _UNKNOWN
            state = RequestState(flag, None)
        else:
            response_status = ResponseStatus.Ok if status == _OK else ResponseStatus.Error
            state = ResponseState(flag, status, None, HEADER_SIZE, len(frame), None)
        return (MessageType.Heartbeat, "", response_status, _folded({}), state, {})

    def _request(self, frame: bytes, flag: int) -> _Parts:
        # Up to the limit, the frame is scanned inline (as latin-1 text when a scan is needed).
        # Above it the arguments dominate the frame: the decoder reads the head and only the
        # tail after the arguments is scanned, so a large argument is never copied into a str.
        small = len(frame) <= _INLINE_SCAN_LIMIT
        # A connection calls few methods: their heads (dubbo version, path, version, method,
        # descriptor) repeat byte for byte, so recent ones are recognised by one comparison.
        seen: _Head | None = None
        for raw, head in self._heads:
            if frame.startswith(raw, HEADER_SIZE):
                seen = head
                break
        known = self._known(frame, seen) if seen is not None and small else None
        state: KnownRequest | RequestState
        if known is not None:
            # The message gets its own attribute table and values; the state is shared.
            method, state = known.method, known
            attributes, values = _folded(known.folded.copy()), known.values.copy()
        else:
            attachments, args_start, count, method, attributes, values = self._scan_request(
                frame, small, seen
            )
            state = RequestState(flag, attachments, (args_start, count))
        message_type = _REQUEST if flag & FLAG_TWOWAY else _ONEWAY
        return (message_type, method, _UNKNOWN, attributes, state, values)

    @staticmethod
    def _known(frame: bytes, seen: _Head) -> KnownRequest | None:
        """The shared state of a request after a known head whose map was parsed before.

        The attachments usually repeat too (path, interface, version, group, ...): a map seen
        after this head before is recognised by its bytes, not parsed again. ``None`` when the
        map is new (or lookups stopped paying off).
        """
        maps = seen.maps
        if maps is None:
            return None
        count, length = seen.arg_count, seen.length
        args_start = HEADER_SIZE + length
        map_start = skip_compact_strings(frame, args_start, count)
        if map_start < 0 or not frame[args_start:map_start].isascii():
            return None
        known = maps.get(frame[map_start:])
        if known is None:
            seen.miss()
        elif seen.misses:
            seen.misses = 0
        return known

    def _scan_request(self, frame: bytes, small: bool, seen: _Head | None) -> _Request:
        """Read a request body (inline scan where it can, the Hessian decoder otherwise)."""
        text = frame.decode("latin-1") if small else None
        fast = (
            scan_request(frame, text, HEADER_SIZE, seen, self.max_hessian_items)
            if text is not None
            else None
        )
        if fast is not None:
            # The common shape: compact ASCII strings throughout, string attachments.
            head, strings, folded, args_start, count, map_start = fast
            if seen is None and args_start - HEADER_SIZE <= _HEAD_BYTES_MAX:
                seen = _Head(head, count, args_start - HEADER_SIZE)
                self._heads.insert(0, (frame[HEADER_SIZE:args_start], seen))
                del self._heads[_HEAD_CACHE_SIZE:]
            dubbo_version, path, version, method, desc = head
            attachments = Attachments(strings, None, map_start, len(frame))
        else:
            attachments, args_start, count, fields = self._request_general(frame, text)
            dubbo_version, path, version, method, desc = fields
            strings = attachments.strings
            folded = {key.lower(): (key, value) for key, value in strings.items()}
            _check_keys(frame, attachments, len(folded))
        # As in Java's DecodeableRpcInvocation, non-empty `interface` and `version` attachments
        # win over the body's path and version (so a mutation of them is what routing sees);
        # the method is the body's.
        folded["interface"] = ("interface", strings.get("interface") or path)
        folded["method"] = ("method", method)
        version = strings.get("version") or version
        if version:
            folded["version"] = ("version", version)
        values: dict[str, Any] = {
            "dubbo_version": dubbo_version,
            "service_path": path,
            "parameter_types": desc,
        }
        if attachments.others:
            values["attachments"] = attachments.others
        elif (
            seen is not None
            and seen.maps is not None
            and len(seen.maps) < _MAP_CACHE_SIZE
            and len(frame) - attachments.start <= _MAP_BYTES_MAX
            and frame[attachments.start] == _TAG_MAP_UNTYPED
            and frame[-1] == _TAG_END
        ):
            # Remember this map for the head (copies: the message's own dicts are its own).
            seen.maps.setdefault(
                frame[attachments.start :],
                KnownRequest(
                    method,
                    strings,
                    dict(folded),
                    dict(values),
                    (args_start, count),
                    len(frame) - attachments.start,
                ),
            )
        return attachments, args_start, count, method, _folded(folded), values

    def _request_general(
        self, frame: bytes, text: str | None
    ) -> tuple[Attachments, int, int, tuple[str, str, str, str, str]]:
        """Any request body: inline reads where possible, the Hessian decoder otherwise."""
        new_decoder = self._new_decoder
        head: list[str] = []
        pos = scan_strings(frame, text, HEADER_SIZE, 5, head) if text is not None else -1
        decoder: Decoder | None = None
        if text is not None and pos >= 0 and text[HEADER_SIZE:pos].isascii():
            dubbo_version, path, version, method, desc = head
            count = parameter_count(desc, pos) if desc else 0
            args_start = pos
            # Fast path: every argument is a compact ASCII string.
            args_end = skip_compact_strings(frame, pos, count)
            if args_end >= 0 and text[pos:args_end].isascii():
                pos = args_end
            else:
                pos, decoder = skip_values(frame, pos, count, new_decoder)
        else:
            pos = -1
        if pos < 0:
            pos = HEADER_SIZE
            dubbo_version, pos = read_string(frame, pos)
            path, pos = read_string(frame, pos)
            version, pos = read_string(frame, pos)
            method, pos = read_string(frame, pos)
            desc_offset = pos
            desc, pos = read_string(frame, pos)
            count = parameter_count(desc, desc_offset) if desc else 0
            args_start = pos
            pos, decoder = skip_values(frame, pos, count, new_decoder)
        if pos == len(frame):
            # Nothing after the arguments: no attachments map (tolerated, as Dubbo does).
            attachments = Attachments({}, None, pos, pos)
        else:
            attachments = read_attachments(
                frame, pos, decoder, text, new_decoder, self.max_hessian_items
            )
        return attachments, args_start, count, (dubbo_version, path, version, method, desc)

    def _response(self, frame: bytes, flag: int, status: int, body_length: int) -> _Parts:
        if status != _OK:
            # Error statuses carry the error message as a Hessian string.
            values: dict[str, Any] = {"status": status}
            if body_length:
                message, _ = read_string(frame, HEADER_SIZE)
                values["error_message"] = message
            state = ResponseState(flag, status, None, HEADER_SIZE, len(frame), None)
            return (MessageType.Error, "", ResponseStatus.Error, _folded({}), state, values)
        plain = _PLAIN[flag, frame[HEADER_SIZE]] if body_length else None
        if plain is not None:
            # The usual shape: a one-byte flag 0..2, then the value up to the end. Nothing in
            # the state depends on the frame, so one shared state serves them all.
            state, response_status, plain_flag = plain
            attributes = _folded({})
            values = {"status": status, "result_flag": plain_flag}
        else:
            response_status, attributes, state, values = self._ok_body(frame, flag, status)
        return (_RESPONSE, "", response_status, attributes, state, values)

    def _ok_body(
        self, frame: bytes, flag: int, status: int
    ) -> tuple[ResponseStatus, Attributes, ResponseState, dict[str, Any]]:
        """Any OK response body: result flag, value (walked over only when attachments
        follow it) and attachments."""
        values: dict[str, Any] = {"status": status}
        end = len(frame)
        pos = HEADER_SIZE
        if pos >= end:
            raise FramingError("OK response with an empty body", offset=pos)
        tag = frame[pos]
        result_flag: ResultFlag | None
        attachments: Attachments | None = None
        decoder: Decoder | None = None
        if tag == TAG_NULL and pos + 1 == end:
            # dubbo-remoting writes a null result as a bare null, without a result flag: no
            # value to keep when a mutation rewrites it with flag 5 (null value, attachments).
            result_flag = None
            value_start = value_end = end
        else:
            if COMPACT_INT_ZERO <= tag <= COMPACT_INT_ZERO + 5:  # the usual one-byte flag
                raw_flag: Any = tag - COMPACT_INT_ZERO
                value_start = pos + 1
            else:
                decoder = self._new_decoder(frame, pos)
                raw_flag = decoder.read()
                value_start = decoder.offset
                if (
                    type(raw_flag) is bool
                    or not isinstance(raw_flag, int)
                    or not 0 <= raw_flag <= 5
                ):
                    raise FramingError(f"bad result flag {raw_flag!r}, expected 0..5", offset=pos)
            # Precomputed per flag: enum member and properties are slow to evaluate per call.
            result_flag, has_value, has_attachments, response_status = _FLAG_INFO[raw_flag]
            if has_attachments:
                # The attachments follow the value: only then is the value walked over.
                value_end = value_start
                if has_value:
                    value_end, decoder = skip_values(frame, value_start, 1, self._new_decoder)
                attachments = read_attachments(
                    frame, value_end, decoder, None, self._new_decoder, self.max_hessian_items
                )
            else:
                # Nothing follows the value (if any): it runs to the end of the body, and a
                # proxy has no reason to parse it.
                value_end = TO_END
            values["result_flag"] = raw_flag
        if result_flag is None:
            response_status = ResponseStatus.Ok
        if attachments is None:
            attributes = _folded({})
        else:
            attributes = Attributes.from_strings(attachments.strings)
            if attachments.others:
                values["attachments"] = attachments.others
        state = ResponseState(flag, status, result_flag, value_start, value_end, attachments)
        return response_status, attributes, state, values

    def peek_reply(self, buffer: bytearray) -> ReplyHead | None:
        """The id, size and status of an OK response whose body is a result flag 0..2 and a
        value (what :meth:`decode` reads without parsing the value); ``None`` for the rest."""
        if len(buffer) < HEADER_SIZE + 1:
            return None
        magic, flag, status, request_id, body_length = _HEADER_FIELDS(buffer)
        size = HEADER_SIZE + body_length
        if (
            magic != MAGIC
            or status != _OK
            or body_length <= 0
            or size > len(buffer)
            or size > self.max_frame_size
        ):
            return None
        plain = _PLAIN[flag, buffer[HEADER_SIZE]]  # None for a request, event, not Hessian 2
        if plain is None:
            return None
        _, response_status, _ = plain
        return request_id, size, response_status

    def relabel(self, frame: bytes, request_id: int) -> Encoded:
        """``frame`` with ``request_id`` written over its own (above 16 KiB, the rest of the
        frame follows the new header as a view, not a copy)."""
        head = _FRONT_ID(frame[:4], request_id)
        if len(frame) <= _COPY_LIMIT:
            return head + frame[12:]
        return [head, memoryview(frame)[12:]]

    # -- encoding ------------------------------------------------------------------------------

    def encode(
        self,
        message: Metadata,
        mutation: Mutation | None = None,
        *,
        request_id: int | None = None,
    ) -> Encoded:
        """The frame with ``mutation`` written into its attachments and, if given, a new id.

        With nothing to change this returns ``message.frame`` itself. Mutations go into the
        request attachments, or the response attachments (upgrading result flags 0..2 to
        3..5). Error responses and heartbeats have no attachments: a non-empty mutation on
        them raises :class:`~metaprotocol_sdk.MutationError`.
        """
        frame = message.frame
        state = message.codec_state
        if mutation:
            # The request's attachment keys, lower-cased (or a superset of them).
            keys: AbstractSet[str]
            if type(state) is KnownRequest:
                keys = state.folded_keys
                if len(frame) <= _COPY_LIMIT:
                    # _added_pairs refuses a 'method' key (checked once per mutation).
                    added, folded = self._pairs(mutation)
                    if keys.isdisjoint(folded):  # no key is replaced, even ignoring case
                        return self._splice(frame, len(frame), added, request_id)
                _refuse_method(mutation)
                state = state.state(frame)
            else:
                # Every string attachment is in the attribute table under its folded key (with
                # interface, method, version), which filters read and do not change.
                keys = message.attributes.folded_items.keys()
                if type(state) is RequestState:
                    _refuse_method(mutation)
            if isinstance(state, RequestState) and state.attachments is not None:
                return self._mutate_request(frame, state, mutation, request_id, keys)
            if isinstance(state, ResponseState) and self._can_carry(state):
                return self._mutate_response(frame, state, mutation, request_id)
            raise MutationError(self._why_not(message))
        if request_id is not None and request_id != message.request_id:
            return self.relabel(frame, request_id)
        return frame

    def _can_carry(self, state: ResponseState) -> bool:
        if state.flag & FLAG_EVENT or state.status != _OK:
            return False
        return state.attachments is not None or self.upgrade_result_flag

    @staticmethod
    def _why_not(message: Metadata) -> str:
        state = message.codec_state
        if message.message_type is MessageType.Heartbeat:
            return "a Dubbo heartbeat (event) carries no attachments to mutate"
        if isinstance(state, ResponseState) and state.status != _OK:
            return (
                f"a Dubbo error response (status {state.status}) carries only a message, "
                "no attachments to mutate"
            )
        if isinstance(state, ResponseState):
            return (
                f"result flag {state.result_flag} carries no attachments and "
                "upgrade_result_flag is off"
            )
        return "this message was not decoded by DubboCodec; nothing to mutate"

    def _mutate_request(
        self,
        frame: bytes,
        state: RequestState,
        mutation: Mutation,
        request_id: int | None,
        keys: AbstractSet[str],
    ) -> Encoded:
        """``mutation`` written into a request; ``keys`` holds its attachment keys lower-cased
        (a superset of them will do: a key in it that the map lacks only costs the splice)."""
        attachments = state.attachments
        assert attachments is not None
        start, end = attachments.start, attachments.end
        added, folded = self._pairs(mutation)
        if (
            attachments.all_strings
            and end - start >= 2
            and frame[start] == _TAG_MAP_UNTYPED
            and frame[end - 1] == _TAG_END
            and keys.isdisjoint(folded)
        ):
            # Only new keys (even ignoring case): splice their pairs in before the map's end
            # marker, so the whole body up to there (arguments and existing attachments) stays
            # an untouched slice.
            if len(frame) <= _COPY_LIMIT:
                return self._splice(frame, end, added, request_id)
            view = memoryview(frame)
            tail = view[end:]
            body_length = end - 1 - HEADER_SIZE + len(added) + len(tail)
            parts: list[bytes | memoryview] = [
                self._header(frame, body_length, request_id),
                view[HEADER_SIZE : end - 1],
                added,
            ]
        else:
            view = memoryview(frame)
            tail = view[end:]
            if start == end:
                block = b"H" + added
            elif attachments.all_strings:
                block = encode_string_map(merge_strings(attachments.strings, folded))
            else:
                block = rewrite_map(
                    frame, start, end, dict(mutation), state.args, self._new_decoder
                )
            body_length = start - HEADER_SIZE + len(block) + len(tail)
            # The arguments travel as an untouched slice of the original frame.
            parts = [self._header(frame, body_length, request_id), view[HEADER_SIZE:start], block]
        if tail:
            parts.append(tail)
        return parts

    def _pairs(self, mutation: Mutation) -> _Added:
        """:func:`_added_pairs` of ``mutation`` (its pairs, and it folded), the last one
        remembered: a route sends the same mapping with each request. Recognised as the same
        object with equal items (one changed since is encoded and checked anew; only one that
        removed and re-added an item as it was keeps the order it had), which costs about a
        fifth of building the items tuple that keys ``_ADDED_PAIRS`` (callgrind: 470
        instructions against 2 100)."""
        if mutation is self._mutation and mutation == self._mutation_copy:
            return self._mutation_pairs
        pairs = _added_pairs(mutation)
        self._mutation, self._mutation_copy, self._mutation_pairs = mutation, dict(mutation), pairs
        return pairs

    @staticmethod
    def _splice(frame: bytes, end: int, added: bytes, request_id: int | None) -> bytes:
        """A small request with ``added`` (pairs and 'Z') in place of its map's end at
        ``end - 1``: one new frame costs less than views and a list of buffers."""
        body_length = len(frame) - HEADER_SIZE + len(added) - 1
        if request_id is None:
            header = frame[:BODY_LENGTH_OFFSET] + _LENGTH.pack(body_length)
        else:
            header = _PACK_HEADER(MAGIC, frame[2], frame[3], request_id, body_length)
        if end == len(frame):  # the map ends the frame, as it usually does
            return b"".join((header, frame[HEADER_SIZE : end - 1], added))
        return b"".join((header, frame[HEADER_SIZE : end - 1], added, frame[end:]))

    def _mutate_response(
        self,
        frame: bytes,
        state: ResponseState,
        mutation: Mutation,
        request_id: int | None,
    ) -> Encoded:
        view = memoryview(frame)
        attachments = state.attachments
        if attachments is not None:
            if attachments.all_strings:
                block = encode_string_map(
                    merge_strings(attachments.strings, fold_mutation(mutation))
                )
            else:
                replay = (state.value_start, 1 if state.value_start < attachments.start else 0)
                block = rewrite_map(
                    frame,
                    attachments.start,
                    attachments.end,
                    dict(mutation),
                    replay,
                    self._new_decoder,
                )
            head: list[bytes | memoryview] = [view[HEADER_SIZE : attachments.start]]
            tail = view[attachments.end :]
        else:
            # Flags 0..2 (or dubbo-remoting's flagless null): switch to the flag that carries
            # attachments and append the map after the value, which must end the frame (else a
            # decoder would read the map from inside a broken value).
            _check_value_ends_frame(frame, state, self._new_decoder)
            result_flag = state.result_flag
            new_flag = (
                ResultFlag.RESPONSE_NULL_VALUE_WITH_ATTACHMENTS
                if result_flag is None
                else result_flag.with_attachments
            )
            block = encode_string_map(dict(fold_mutation(mutation).values()))
            head = [
                bytes((COMPACT_INT_ZERO + new_flag,)),
                view[state.value_start : state.value_end],
            ]
            tail = view[state.value_end :]
        body_length = sum(len(p) for p in head) + len(block) + len(tail)
        parts: list[bytes | memoryview] = [
            self._header(frame, body_length, request_id),
            *head,
            block,
        ]
        if tail:
            parts.append(tail)
        return parts

    @staticmethod
    def _header(frame: bytes, body_length: int, request_id: int | None) -> bytes:
        if request_id is None:
            return frame[:BODY_LENGTH_OFFSET] + _LENGTH.pack(body_length)
        return frame[:4] + _ID_LENGTH.pack(request_id, body_length)

    # -- local replies -------------------------------------------------------------------------

    def on_error(self, metadata: Metadata, error: LocalError) -> bytes:
        """A Dubbo error response (status from :data:`~metaprotocol_dubbo.status.ERROR_STATUS`).

        The body is the message as a Hessian string, which Dubbo consumers raise as a remote
        exception; the request id is the request's.
        """
        status = error_status(error.type)
        text = f"{error.type.name}: {error.message}" if error.message else error.type.name
        body = encode_string(text)
        return build_header(HESSIAN2, status, metadata.request_id, len(body)) + body

    def heartbeat_reply(self, metadata: Metadata) -> bytes | None:
        """The reply to a two-way heartbeat request (event flag, Hessian null body), else None."""
        state = metadata.codec_state
        if metadata.message_type is not MessageType.Heartbeat or not isinstance(
            state, RequestState
        ):
            return None
        if not state.flag & FLAG_TWOWAY:
            return None  # one-way events (Dubbo's read-only notice) expect no answer
        flag = FLAG_EVENT | (state.flag & SERIALIZATION_MASK)
        return build_header(flag, _OK, metadata.request_id, 1) + _NULL_BODY

    def heartbeat_request(self, request_id: int) -> bytes:
        """Dubbo's heartbeat request, as Apache Dubbo's ``HeartbeatTimerTask`` sends it on an
        idle channel: a two-way event request (flag 0xE2: request, two-way, event, Hessian 2)
        whose body is the Hessian null ``N`` (``HEARTBEAT_EVENT``). The peer answers with an
        event response carrying ``request_id``; providers close a channel idle for three
        heartbeat intervals (180 s by default)."""
        return heartbeat_request(request_id)

    # -- drain notice --------------------------------------------------------------------------

    def drain_notice(self) -> bytes:
        """Dubbo's read-only event, which a provider sends each consumer when it shuts down
        gracefully: a one-way event request whose body is the Hessian string ``"R"``. Apache
        Dubbo consumers mark the connection read-only and send new calls to other providers."""
        return DRAIN_NOTICE

    def is_drain_notice(self, metadata: Metadata) -> bool:
        """True for a read-only event: a one-way event request whose body is the Hessian
        string ``"R"`` (in any of Hessian's encodings of it). A heartbeat (a two-way event
        with a null body) and an event response are not."""
        state = metadata.codec_state
        if metadata.message_type is not MessageType.Heartbeat or not isinstance(
            state, RequestState
        ):
            return False
        frame = metadata.frame
        if state.flag & FLAG_TWOWAY or not HEADER_SIZE < len(frame) <= _NOTICE_SIZE_MAX:
            return False
        body = bytes(frame[HEADER_SIZE:])
        if body == READONLY_BODY:  # as Java's Hessian2Output and hessian.js write it
            return True
        try:
            value, end = read_string(body, 0)
        except CodecError:
            return False
        except _PARSE_ERRORS:
            return False
        return end == len(body) and value == READONLY_EVENT


#: ``Request.READONLY_EVENT``: the data of the event a provider sends when it shuts down.
READONLY_EVENT = "R"
#: The read-only event's body as Hessian 2 writes ``"R"``: a compact string of length 1.
READONLY_BODY = encode_string(READONLY_EVENT)
#: The longest read-only event :meth:`DubboCodec.is_drain_notice` reads the body of: room for
#: ``"R"`` written in chunks; a longer event body is not parsed (any event body could be).
_NOTICE_SIZE_MAX = HEADER_SIZE + 16
#: :meth:`DubboCodec.drain_notice`, as ``HeaderExchangeServer.sendChannelReadOnlyEvent``
#: writes it: flag 0xA2 (request, event, not two-way, Hessian 2). Request id 0: a one-way
#: event gets no reply, so its id is never matched against anything (Apache Dubbo takes the
#: next value of its request counter, and its consumers read any id alike); a fixed id keeps
#: the notice free of parse state. dubbo-ssl-python answers every event request with a
#: heartbeat response, which carries this id and needs no answer itself.
DRAIN_NOTICE = build_header(FLAG_REQUEST | FLAG_EVENT | HESSIAN2, 0, 0, len(READONLY_BODY)) + (
    READONLY_BODY
)


def heartbeat_request(request_id: int) -> bytes:
    """A two-way heartbeat request frame (what Dubbo consumers and providers send when idle):
    :meth:`DubboCodec.heartbeat_request`."""
    return build_header(FLAG_REQUEST | FLAG_TWOWAY | FLAG_EVENT | HESSIAN2, 0, request_id, 1) + (
        _NULL_BODY
    )
