"""Structured access log: one JSON object per request, to stderr or a file, and to an
OpenTelemetry collector (:mod:`.otlp_logs`). Off by default.

Lines are gathered in memory and handed to a writer thread once they reach
:data:`FLUSH_BYTES`, and at least once a second (the engine's sweep calls
:meth:`AccessLog.flush`), so a reader tailing the file sees each line within a second. The
thread does the writes, so a log that stops taking them (a pipe nobody reads, a hung network
mount) never stops the event loop; at most :data:`MAX_PENDING_BYTES` wait for it, and lines
beyond that are dropped and counted. A write that fails (a full disk, a file removed from under
a read-only mount) drops the lines it carried and is counted too; neither reaches the request
that finished, so the proxy keeps answering whatever happens to its log.
"""

from __future__ import annotations

import errno
import os
import select
import sys
import time
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..metadata import Attributes
from .authorization import spiffe_uris_of
from .writer import BackgroundWriter

if TYPE_CHECKING:
    from .config.models import OtlpLogs
    from .otlp_logs import OtlpLogSink

#: Gathered lines are handed to the writer once they reach this many bytes (and every sweep).
FLUSH_BYTES = 64 * 1024

#: Bytes handed to the writer and not yet written, above which new lines are dropped.
MAX_PENDING_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """What the access log says of a client's connection, found once per connection:
    its address (``ip:port``, ``[ip]:port`` for IPv6; empty when unknown) and the
    ``spiffe://`` identities of its TLS certificate, comma-separated as Envoy's
    ``%DOWNSTREAM_PEER_URI_SAN%`` (``None``: plain text or none)."""

    address: str = ""
    principal: str | None = None


#: A JSON string literal of a str (quotes, escapes, non-ASCII as ``\\uXXXX``), in C.
_q = encode_basestring_ascii


def _object(fields: dict[str, str]) -> str:
    """The JSON object of a mapping of strings."""
    return "{" + ",".join([f"{_q(key)}:{_q(value)}" for key, value in fields.items()]) + "}"


#: A client nothing is known of.
NO_CLIENT = ClientFacts()


def client_facts(transport: Any) -> ClientFacts:
    """The access log's facts of the client on ``transport``."""
    peer = transport.get_extra_info("peername")
    address = ""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        address = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    ids = spiffe_uris_of(transport.get_extra_info("peercert"))
    return ClientFacts(address, ",".join(ids) if ids else None)


#: How long closing waits for the writer to finish what it holds.
CLOSE_WAIT = 2.0

#: Paths meaning standard error.
STDERR_PATHS = ("-", "stderr", "/dev/stderr")


def _open(path: str) -> int:
    """The access log's file, opened for appending; a :class:`ConfigError` naming the field
    if it cannot be. The open does not wait: a FIFO without a reader (a log shipper not yet
    started) would otherwise hold the engine's start for good."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.ENXIO:
            why = "a FIFO that nobody reads (start its reader first)"
        raise ConfigError(f"{path}: cannot be opened: {why}", field="spec.accessLog.path") from None
    os.set_blocking(fd, True)  # the writer thread waits for a slow reader, not the engine
    return fd


class AccessLog:
    """Writes one JSON line per finished request. ``path`` ``-`` means stderr, ``None`` no
    file; ``otlp``: a collector the lines are exported to too;
    ``attributes``: the request attributes each line carries (when the request has them),
    each value cut to ``max_value_length`` characters; ``failures_only``, ``slower_than``:
    write only the requests that failed, or took at least that long (seconds), as
    :meth:`wants` says."""

    def __init__(
        self,
        path: str | None,
        attributes: tuple[str, ...] = (),
        max_value_length: int = 256,
        failures_only: bool = False,
        slower_than: float | None = None,
        otlp: OtlpLogs | None = None,
    ) -> None:
        self.path = path
        #: Every request is written (no filter).
        self.every = not failures_only and slower_than is None
        self._failures = failures_only
        #: ``inf``: no duration condition.
        self._slower = float("inf") if slower_than is None else slower_than
        #: ``(key as configured, key folded)`` of each logged attribute.
        self._attributes = tuple((key, key.lower()) for key in attributes)
        self._longest = max_value_length
        self._own = path is not None and path not in STDERR_PATHS
        self._fd = -1
        self._writer: BackgroundWriter | None = None
        if path is not None:
            if self._own:
                self._fd = _open(path)
            else:
                sys.stderr.flush()
                self._fd = sys.stderr.fileno()
            self._writer = BackgroundWriter(self._fd, f"access log {path}", MAX_PENDING_BYTES)
        self._otlp: OtlpLogSink | None = None
        if otlp is not None:
            from .otlp_logs import OtlpLogSink

            self._otlp = OtlpLogSink(otlp, MAX_PENDING_BYTES)
        self._lines: list[str] = []
        self._size = 0
        #: Lines dropped because the file's writer was MAX_PENDING_BYTES behind.
        self.overflow_lines = 0
        #: Lines dropped because the collector's exports were MAX_PENDING_BYTES behind.
        self.otlp_overflow = 0

    @property
    def failed_writes(self) -> int:
        """Writes to the file that failed (their lines are dropped)."""
        return 0 if self._writer is None else self._writer.failed_writes

    @property
    def dropped_lines(self) -> int:
        """Lines never written to the file: the writer too far behind, or a failed write."""
        return self.overflow_lines + (0 if self._writer is None else self._writer.failed_items)

    @property
    def failed_exports(self) -> int:
        """Exports to the collector that failed (their records are dropped)."""
        return 0 if self._otlp is None else self._otlp.failed_writes

    @property
    def dropped_records(self) -> int:
        """Lines the collector never took: the exports too far behind, an export that
        failed, or records it rejected."""
        return self.otlp_overflow + (0 if self._otlp is None else self._otlp.failed_items)

    def log(
        self,
        listener: str,
        route: str,
        destination: str,
        status: str,
        duration: float,
        request_id: int,
        message_type: str,
        upstream: str = "",
        response_flags: str = "-",
        details: str | None = None,
        client: ClientFacts = NO_CLIENT,
        bytes_received: int = 0,
        bytes_sent: int = 0,
        attributes: Attributes | None = None,
        dry_run: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """Record one request (``duration`` in seconds; ``response_flags``: Envoy's short
        flags, ``-`` for none, as Istio's ``response_flags`` label has them; ``details``:
        Envoy's ``response_code_details``, written when given, e.g. the policy that denied
        the request; ``client``: its connection's address and TLS identity;
        ``bytes_received``, ``bytes_sent``: the request's and the reply's frames;
        ``dry_run``: what the dry-run AuthorizationPolicies decide for it)."""
        # One f-string, not a dict through json.dumps: 3-5x faster (see docs/proxy.md,
        # "Access log"); every string goes through the json module's own escaping.
        line = (
            f'{{"time":{time.time():.6f},"listener":{_q(listener)},"route":{_q(route)},'
            f'"destination":{_q(destination)},"upstream":{_q(upstream)},'
            f'"downstream":{_q(client.address)},"status":{_q(status)},'
            f'"response_flags":{_q(response_flags)},"duration_ms":{duration * 1000.0:.3f},'
            f'"request_id":{int(request_id)},"message_type":{_q(message_type)},'
            f'"bytes_received":{bytes_received},"bytes_sent":{bytes_sent}'
        )
        if client.principal is not None:
            line += f',"source_principal":{_q(client.principal)}'
        if details is not None:
            line += f',"response_code_details":{_q(details)}'
        if self._attributes and attributes is not None:
            line += ',"attributes":' + _object(self._chosen(attributes))
        if dry_run:
            sets = ",".join([f"{_q(name)}:{_object(result)}" for name, result in dry_run.items()])
            line += f',"dry_run":{{{sets}}}'
        line += "}\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def wants(self, status: str, duration: float) -> bool:
        """Whether a request of ``status`` that took ``duration`` seconds gets a line."""
        return self.every or (self._failures and status != "Ok") or duration >= self._slower

    def _chosen(self, attributes: Attributes) -> dict[str, str]:
        """The configured attributes the request has, each cut to the longest allowed."""
        chosen = {}
        longest = self._longest
        for key, folded in self._attributes:
            value = attributes.get_folded(folded)
            if value is not None:
                chosen[key] = value if len(value) <= longest else value[:longest] + "..."
        return chosen

    def flush(self) -> None:
        """Hand the gathered lines to the writer, or drop and count them when it is
        :data:`MAX_PENDING_BYTES` behind. Never blocks on the log and never raises."""
        lines = self._lines
        if not lines:
            return
        self._lines = []
        self._size = 0
        if self._writer is not None and not self._writer.submit(self._chunks(lines), len(lines)):
            self.overflow_lines += len(lines)
        if self._otlp is not None and not self._otlp.submit(lines):
            self.otlp_overflow += len(lines)

    def _chunks(self, lines: list[str]) -> list[bytes]:
        """The bytes to write, one write each. A file opened in append mode takes any size
        whole; standard error, shared by every worker of ``--workers`` and often a pipe, gets
        whole lines in writes of at most ``PIPE_BUF`` bytes, which a pipe never interleaves
        with another process's writes."""
        if self._own:
            return ["".join(lines).encode("utf-8")]
        out: list[bytes] = []
        batch: list[bytes] = []
        size = 0
        for line in lines:
            data = line.encode("utf-8")
            if batch and size + len(data) > select.PIPE_BUF:
                out.append(b"".join(batch))
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        if batch:
            out.append(b"".join(batch))
        return out

    def close(self) -> None:
        """Hand over the last lines, give the writer up to :data:`CLOSE_WAIT` seconds to write
        them, and close the file if this log opened it (not while the writer may still use it:
        a writer stuck on a log nobody reads is left to the process's exit)."""
        self.flush()
        if self._otlp is not None:
            self._otlp.close(CLOSE_WAIT)
        if self._writer is not None and self._writer.close(CLOSE_WAIT) and self._own:
            os.close(self._fd)
            self._own = False
