"""Istio's TCP metadata exchange (ALPN ``istio-peer-exchange``) on the engine's mesh listeners.

An Istio sidecar client offers ALPN ``istio-peer-exchange`` (and ``istio``). When the server
selects it, each side starts what it sends with a header of its own workload's metadata,
before the application's bytes (Istio's ``istio.metadata_exchange`` network filter, in
Envoy's ``contrib/istio/filters/network/metadata_exchange``): a magic number
(``0x3D230467``) and a length, both 32-bit big-endian, then a ``google.protobuf.Any`` of a
``google.protobuf.Struct`` holding ``x-envoy-peer-metadata`` (the workload: ``NAME``,
``NAMESPACE``, ``WORKLOAD_NAME``, ``CLUSTER_ID``, ``LABELS`` with the app, version and
canonical service labels, ``OWNER``) and ``x-envoy-peer-metadata-id`` (the node id). Each
side reports the other's workload in Istio's metrics (``source_workload``, ``source_app``...
at the server side), which a peer known by its certificate alone leaves ``unknown``.

The engine selects ``istio-peer-exchange`` when a client offers it, reads the client's
header before handing the connection to its codec (:class:`PeerExchange`, in the TLS
layer's place of the connection's protocol until then: nothing of it runs afterwards), and
writes its own header before any reply. A client whose bytes do not start with the magic
number is served as if it had sent none (as Envoy does). The protobuf messages are read and
written here by hand (the engine does not depend on protobuf): only the fields above, every
length checked, in time linear in the header; a header above :data:`MAX_HEADER` bytes ends
the connection (the exchange's metadata is a few hundred bytes).

As a client (:class:`UpstreamExchange`), on ``ISTIO_MUTUAL`` connections (explicit or
automatic), the engine offers ``istio-peer-exchange`` then ``istio`` (as istiod's
``ALPNInMeshWithMxc``); when the server selects the first, it writes the same header before
its first request and reads the server's as the first bytes of the connection, with the same
bounds; a server whose bytes do not start with the magic number is served as if it had sent
none. With ``reporter: source`` the server's workload fills the destination labels of
Istio's metrics (telemetry.py). Either side hands the connection back to its own protocol
once the header is read: the data path after it is the one of any connection.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from metaprotocol_sdk.enums import ErrorType

if TYPE_CHECKING:
    from .config.models import Workload
    from .downstream import Downstream
    from .telemetry import Identities, TcpSeries
    from .upstream import UpstreamConnection

log = logging.getLogger("metaprotocol.proxy")

#: The ALPN protocol of the exchange.
ALPN = "istio-peer-exchange"
MAGIC = 0x3D230467
_HEADER = struct.Struct(">II")
_MAGIC_BYTES = struct.pack(">I", MAGIC)
#: The largest exchange read (its Any): a client announcing more is a hostile one.
MAX_HEADER = 64 * 1024
#: The longest value of the peer's metadata reported: a longer one is ``unknown``.
MAX_VALUE = 253
#: The most protobuf fields read of a header (a sidecar's has about 60, one that sends its
#: pod's every label a few hundred): past them it is malformed, served without its labels,
#: so that reading one costs the event loop about a TLS handshake at most, whatever its
#: 64 KiB say (tens of thousands of two-byte fields took about 30 ms).
MAX_FIELDS = 1024
STRUCT_TYPE = "type.googleapis.com/google.protobuf.Struct"
METADATA_KEY = "x-envoy-peer-metadata"
METADATA_ID_KEY = "x-envoy-peer-metadata-id"
OWNER_PREFIX = "kubernetes://apis/apps/v1/namespaces/"
CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"
#: Read before ``app`` and ``version`` when a header has them (Istio's
#: ``convertStructToWorkloadMetadata``).
APP_NAME = "app.kubernetes.io/name"
APP_VERSION = "app.kubernetes.io/version"


@dataclass(frozen=True)
class PeerWorkload:
    """A peer's workload as its exchange says (``""``: not said)."""

    instance: str = ""
    namespace: str = ""
    workload: str = ""
    cluster: str = ""
    canonical_service: str = ""
    canonical_revision: str = ""
    app: str = ""
    version: str = ""


# -- the protobuf wire format, for Any, Struct and Value only ---------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _string_value(text: str) -> bytes:
    return _field(3, text.encode())  # Value.string_value


def _struct(fields: dict[str, bytes]) -> bytes:
    """A Struct of already encoded Values, its keys sorted (protobuf's deterministic order)."""
    return b"".join(
        _field(1, _field(1, key.encode()) + _field(2, value))  # fields: map entry key, value
        for key, value in sorted(fields.items())
    )


def exchange_header(workload: Workload, instance: str, node_id: str = "") -> bytes:
    """The header this engine sends: its workload as Istio's ``convertWorkloadMetadataToStruct``
    writes it."""
    labels = {
        CANONICAL_NAME: workload.canonical_service,
        CANONICAL_REVISION: workload.canonical_revision,
        "app": workload.app,
        "version": workload.version,
    }
    known = {k: v for k, v in labels.items() if v and v != "unknown"}
    metadata: dict[str, bytes] = {
        "LABELS": _field(5, _struct({k: _string_value(v) for k, v in known.items()})),
    }
    if _said(workload.name):  # an owner naming no workload is none (Istio writes none then)
        metadata["OWNER"] = _string_value(
            f"{OWNER_PREFIX}{_said(workload.namespace)}/deployments/{workload.name}"
        )
    for key, value in (
        ("NAME", instance),
        ("NAMESPACE", _said(workload.namespace)),
        ("WORKLOAD_NAME", _said(workload.name)),
        ("CLUSTER_ID", workload.cluster),
    ):
        if value:
            metadata[key] = _string_value(value)
    top = {METADATA_KEY: _field(5, _struct(metadata))}
    if node_id:
        top[METADATA_ID_KEY] = _string_value(node_id)
    any_message = _field(1, STRUCT_TYPE.encode()) + _field(2, _struct(top))
    return _HEADER.pack(MAGIC, len(any_message)) + any_message


def _said(value: str) -> str:
    return "" if value == "unknown" else value


class _Malformed(ValueError):
    """Bytes that are not the message they should be."""


class _Reader:
    """Reads one header's protobuf fields, at most :data:`MAX_FIELDS` of them."""

    __slots__ = ("data", "left")

    def __init__(self, data: bytes) -> None:
        self.data = data
        #: Fields it may still look at.
        self.left = MAX_FIELDS

    def fields(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """The fields of a message in ``data[start:end]``: (number, wire type, value start,
        value end; a varint's value is its end's, read by :func:`_read_varint`)."""
        data = self.data
        out = []
        at = start
        while at < end:
            self.left -= 1
            if self.left < 0:
                raise _Malformed("too many fields")
            key, at = _read_varint(data, at, end)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, stop = _read_varint(data, at, end)
                out.append((number, wire, at, stop))
                at = stop
            elif wire == 1:
                out.append((number, wire, at, at + 8))
                at += 8
            elif wire == 2:
                size, at = _read_varint(data, at, end)
                out.append((number, wire, at, at + size))
                at += size
            elif wire == 5:
                out.append((number, wire, at, at + 4))
                at += 4
            else:
                raise _Malformed(f"wire type {wire}")
            if at > end:
                raise _Malformed("truncated")
        return out

    def struct(self, start: int, end: int) -> dict[str, tuple[int, int]]:
        """A Struct's values by key (each a Value's span); the last of a repeated key wins,
        as protobuf parses a map (Istio's filter reads the header with it)."""
        data = self.data
        out: dict[str, tuple[int, int]] = {}
        for number, wire, a, b in self.fields(start, end):
            if number != 1 or wire != 2:
                continue
            key = None
            value = (b, b)
            for n, w, c, d in self.fields(a, b):
                if n == 1 and w == 2:
                    key = data[c:d].decode("utf-8", "replace")
                elif n == 2 and w == 2:
                    value = (c, d)
            if key is not None:
                out[key] = value
        return out

    def value(self, span: tuple[int, int] | None, kind: int) -> tuple[int, int] | None:
        """The span of a Value's ``kind`` (3: string_value, 5: struct_value), if it is that:
        the last of its one-of fields (1 to 6) decides, as protobuf parses one."""
        if span is None:
            return None
        found = None
        for number, wire, a, b in self.fields(*span):
            if 1 <= number <= 6:
                found = (a, b) if number == kind and wire == 2 else None
        return found

    def text(self, values: dict[str, tuple[int, int]], key: str) -> str:
        found = self.value(values.get(key), 3)
        if found is None or found[1] - found[0] > MAX_VALUE * 4:
            return ""
        text = self.data[found[0] : found[1]].decode("utf-8", "replace")
        return text if len(text) <= MAX_VALUE else ""


def _read_varint(data: bytes, at: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= end or shift > 63:
            raise _Malformed("bad varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def read_exchange(data: bytes) -> PeerWorkload | None:
    """The peer's workload from the exchange's Any (``None``: it says none, or is not one)."""
    try:
        read = _Reader(data)
        type_url, body = "", (0, 0)
        for number, wire, a, b in read.fields(0, len(data)):
            if number == 1 and wire == 2:
                type_url = data[a:b].decode("utf-8", "replace")
            elif number == 2 and wire == 2:
                body = (a, b)
        if type_url != STRUCT_TYPE:
            return None
        inner = read.value(read.struct(*body).get(METADATA_KEY), 5)
        if inner is None:
            return None
        metadata = read.struct(*inner)
        labels_struct = read.value(metadata.get("LABELS"), 5)
        labels = {} if labels_struct is None else read.struct(*labels_struct)
        return PeerWorkload(
            instance=read.text(metadata, "NAME"),
            namespace=read.text(metadata, "NAMESPACE"),
            workload=read.text(metadata, "WORKLOAD_NAME"),
            cluster=read.text(metadata, "CLUSTER_ID"),
            canonical_service=read.text(labels, CANONICAL_NAME),
            canonical_revision=read.text(labels, CANONICAL_REVISION),
            app=read.text(labels, APP_NAME) or read.text(labels, "app"),
            version=read.text(labels, APP_VERSION) or read.text(labels, "version"),
        )
    except _Malformed:
        return None


# -- the connection's part ---------------------------------------------------------------------


#: What :func:`announced` says of bytes that are not an exchange header (the codec's), and
#: of too few to tell the header's size yet.
NO_HEADER, PARTIAL = -1, -2


def announced(buffer: bytearray) -> int:
    """The size the exchange header at the start of ``buffer`` announces; :data:`PARTIAL`
    while too few bytes tell it, :data:`NO_HEADER` when they do not start with the magic
    number (a peer that selected the protocol and sent its own bytes first)."""
    if len(buffer) < _HEADER.size:
        return PARTIAL if _MAGIC_BYTES.startswith(bytes(buffer[:4])) else NO_HEADER
    magic, size = _HEADER.unpack_from(buffer)
    return int(size) if magic == MAGIC else NO_HEADER


class PeerExchange(asyncio.Protocol):
    """A TLS connection's protocol until the client's exchange header is read: then the
    connection's own (``downstream``), handed what followed it."""

    __slots__ = ("buffer", "downstream", "header", "transport")

    def __init__(self, downstream: Downstream, transport: Any, header: bytes) -> None:
        self.downstream = downstream
        self.transport = transport
        self.buffer = bytearray()
        #: This engine's header, written before the connection's first reply.
        self.header = header

    def start(self) -> None:
        """Take the connection's bytes from now on."""
        self.transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        """Read the header; hand the rest, and the connection, back. A header begun is held
        as a partial frame is (:meth:`_hold`)."""
        buffer = self.buffer
        buffer += data
        self.downstream.seen = True
        size = announced(buffer)
        if size == NO_HEADER:
            self._done(None)  # no exchange: its bytes are the codec's (as Envoy's filter)
            return
        if size == PARTIAL:
            self._hold()
            return
        if size > MAX_HEADER:
            log.debug("peer exchange: a header of %d bytes, above %d: closed", size, MAX_HEADER)
            self.downstream.listener.closed_by["peer_exchange"].value += 1
            self.transport.set_protocol(self.downstream)
            self.downstream.abort()
            return
        if len(buffer) < _HEADER.size + size:
            self._hold()
            return
        peer = read_exchange(bytes(buffer[_HEADER.size : _HEADER.size + size]))
        del buffer[: _HEADER.size + size]
        self._done(peer)

    def _hold(self) -> None:
        """Part of a header is held: as a partial frame's, its bytes count in the buffer
        budget and it must be complete within ``timeouts.frame`` of its first byte (the
        engine's sweep closes it then, ``frame_timeout``), not ``timeouts.idle``."""
        downstream = self.downstream
        if not downstream.partial_since:
            downstream.partial_since = downstream.engine.loop.time()
        downstream._account_held(len(self.buffer))

    def _done(self, peer: PeerWorkload | None) -> None:
        downstream = self.downstream
        downstream._account_held(0)  # the codec's bytes, if any, are its own from here
        downstream.partial_since = 0.0
        self.transport.write(self.header)  # before any reply: the client reads it first
        self.transport.set_protocol(downstream)
        istio = downstream.engine.istio
        if peer is not None and istio is not None and istio.inbound:
            downstream.istio = istio.with_workload(downstream.istio, peer)
        rest, self.buffer = bytes(self.buffer), bytearray()
        if rest:
            downstream.data_received(rest)

    def eof_received(self) -> bool | None:
        self.transport.set_protocol(self.downstream)
        return self.downstream.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.downstream.connection_lost(exc)

    def pause_writing(self) -> None:
        self.downstream.pause_writing()

    def resume_writing(self) -> None:
        self.downstream.resume_writing()


class UpstreamExchange(asyncio.Protocol):
    """An upstream TLS connection's protocol until the server's exchange header is read:
    then the connection's own (``upstream``), handed what followed it.

    The engine's own header was written before the connection's first request (by the
    connection, as the handshake completed). At the client side of Istio's metrics, the
    connection's TCP series wait for the server's workload: meanwhile they count in
    :attr:`tally`, moved to the series of the workload the header says (or of none) once it
    is read, or when the connection ends before."""

    __slots__ = ("buffer", "tally", "transport", "upstream")

    def __init__(self, upstream: UpstreamConnection, transport: Any) -> None:
        self.upstream = upstream
        self.transport = transport
        self.buffer = bytearray()
        #: The connection's TCP series while the exchange runs (``None``: Istio's
        #: client-side metrics are off).
        self.tally: TcpSeries | None = None

    def start(self) -> None:
        """Take the connection's bytes from now on."""
        self.transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        """Read the header; hand the rest, and the connection, back. A header begun is held
        as a partial reply is (:meth:`_hold`)."""
        buffer = self.buffer
        buffer += data
        size = announced(buffer)
        if size == NO_HEADER:
            self._done(None)  # no exchange: its bytes are the codec's (as Envoy's filter)
            return
        if size == PARTIAL:
            self._hold()
            return
        upstream = self.upstream
        if size > MAX_HEADER:
            self.hand_back()
            upstream.give_up(
                "peer_exchange",
                ErrorType.BadResponse,
                f"upstream {upstream.host.key} announced a metadata exchange header of "
                f"{size} bytes, above {MAX_HEADER}",
            )
            return
        if len(buffer) < _HEADER.size + size:
            self._hold()
            return
        peer = None
        istio = upstream.engine.istio
        if istio is not None and not istio.inbound:  # else no series reads it: skipped
            peer = read_exchange(bytes(buffer[_HEADER.size : _HEADER.size + size]))
        del buffer[: _HEADER.size + size]
        self._done(peer)

    def _hold(self) -> None:
        """Part of a header is held: as a partial reply's, its bytes count in the buffer
        budget and it must be complete within ``timeouts.frame`` of its first byte (the
        engine's sweep closes the connection then, ``frame_timeout``)."""
        upstream = self.upstream
        if not upstream.partial_since:
            upstream.partial_since = upstream.engine.loop.time()
        held = len(self.buffer)
        upstream.engine.buffered += held - upstream.held
        upstream.held = held

    def hand_back(self, peer: PeerWorkload | None = None, lost: bool = False) -> None:
        """The connection's own protocol again (``lost``: the transport is gone, nothing to
        set); what the header held released; the TCP series of the server's workload
        (``peer``, if it said one) take the tally."""
        upstream = self.upstream
        upstream.engine.buffered -= upstream.held
        upstream.held = 0
        upstream.partial_since = 0.0
        if not lost:
            self.transport.set_protocol(upstream)
        istio = upstream.engine.istio
        if istio is None or istio.inbound:
            return
        ids: Identities | None = upstream.istio
        if peer is not None:
            ids = upstream.istio = upstream.host.istio = istio.with_workload(ids, peer)
        tally = self.tally
        self.tally = None
        if tally is not None and upstream.tcp is tally:
            cluster = upstream.cluster
            series = istio.tcp(cluster.service, cluster.namespace, upstream.host.labels, ids)
            series.take(tally)
            upstream.tcp = series

    def _done(self, peer: PeerWorkload | None) -> None:
        self.hand_back(peer)
        rest, self.buffer = bytes(self.buffer), bytearray()
        if rest:
            self.upstream.data_received(rest)

    def eof_received(self) -> bool | None:
        self.hand_back()
        return self.upstream.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.hand_back(lost=True)
        self.upstream.connection_lost(exc)

    def pause_writing(self) -> None:
        self.upstream.pause_writing()

    def resume_writing(self) -> None:
        self.upstream.resume_writing()
