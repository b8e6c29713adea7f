"""The admin endpoint: HTTP/1.1 parsed by h11 (GET only) for readiness, config and stats.

* ``/ready``: ``200 LIVE`` while serving, ``503 DRAINING`` during shutdown.
* ``/config_dump``: the validated configuration and the runtime built from it, as JSON.
* ``/stats`` (or ``/stats/prometheus``): Prometheus text; ``/stats?format=json``:
  ``{"name{labels}": value}``.
* ``/``: the live page (:mod:`.admin_page`), which polls ``/stats/live`` (its JSON) every
  second; ``/paths`` lists the paths.

It shares the event loop with the data path, so every cost is bounded: a request (line and
headers) of at most :data:`MAX_REQUEST_BYTES`, ``admin.maxConnections`` open connections,
``admin.requestTimeout`` for a whole exchange, one request per connection, and a
``/config_dump`` built once per configuration (again after each reload, and after a
change of health at most as often as :data:`DUMP_SPACING` allows) with the
documents capped at :data:`DUMP_DOCUMENTS_BYTES`. A client's mistake is an HTTP error, never a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11

from .admin_page import History, Sampler, live_data, page_html
from .listening import ServerGroup, serve_on

if TYPE_CHECKING:
    from .config.models import Admin
    from .engine import Engine
    from .stats import Value

log = logging.getLogger("metaprotocol.proxy.admin")

#: A ``/config_dump`` built again for a change of health (not a reload) waits until this
#: many times its last build's duration has passed since that build.
DUMP_SPACING = 4.0

#: Largest request line plus headers (h11's ``max_incomplete_event_size``); more is ``431``.
MAX_REQUEST_BYTES = 16 * 1024
#: Cap on the JSON of the documents in ``/config_dump`` (the validated model is not capped).
DUMP_DOCUMENTS_BYTES = 1024 * 1024
#: After an error reply, how long and how much the client's unread input is drained for.
LINGER_SECONDS = 1.0
LINGER_BYTES = 256 * 1024
#: The paths of the Prometheus text, and its content type.
STATS_PATHS = ("/stats", "/stats/prometheus")
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
#: The query of ``/stats`` in the form the ``--workers`` supervisor merges
#: (:meth:`.stats.Stats.worker_parts`).
WORKER_FORMAT = "format=worker"
#: What replaces whatever did not fit under :data:`DUMP_DOCUMENTS_BYTES`.
TRUNCATED = "...truncated: /config_dump shows the documents up to {cap} bytes"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _response(
    status: int, body: str | bytes, content_type: str = "text/plain; charset=utf-8"
) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    allow = "Allow: GET\r\n" if status == 405 else ""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n{allow}"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + data


@dataclass
class Streamed:
    """A ``200`` response sent piece by piece as it is made (:meth:`_AdminServer._exchange`):
    no length, the connection's end is the body's."""

    content_type: str
    parts: Iterator[str]

    def head(self) -> bytes:
        """The response's status line and headers."""
        return (
            f"HTTP/1.1 200 OK\r\nContent-Type: {self.content_type}\r\nConnection: close\r\n\r\n"
        ).encode()


def json_parts(parts: Iterator[list[tuple[str, Value]]]) -> Iterator[str]:
    """A JSON object of the pairs in ``parts``, in pieces (one per part)."""
    yield "{"
    sep = "\n  "
    for pairs in parts:
        if pairs:
            yield sep + ",\n  ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs)
            sep = ",\n  "
    yield "\n}\n"


_BUSY = _response(503, "too many admin connections\n")
_TIMEOUT = _response(408, "request not received in time\n")
_INTERNAL = _response(500, "internal error (logged by the engine)\n")


def _pointer_part(key: object) -> str:
    """One JSON Pointer (RFC 6901) reference token."""
    return str(key).replace("~", "~0").replace("/", "~1")


def bounded_copy(value: Any, cap: int, root: str = "") -> tuple[Any, bool]:
    """A JSON-ready copy of ``value`` whose JSON is about ``cap`` bytes at most.

    A mapping or list met a second time (a YAML alias: PyYAML shares the object) is written
    once; later occurrences become ``{"$ref": "<JSON Pointer to the first>"}``, so aliases are
    never expanded. Scalars are copied, and the walk stops once the budget is spent, so its
    cost is bounded by ``cap`` whatever the input. Returns the copy and whether anything was
    cut (each cut is marked with :data:`TRUNCATED`). ``root`` is the pointer of ``value``
    itself in the document it will be part of.
    """
    budget = cap
    cut = False
    marker = TRUNCATED.format(cap=cap)
    # Where a container was written: ``(its parent's place, its token)``, made a pointer only
    # when a later occurrence refers to it. Building every node's pointer as a string cost
    # the length of its path each (a long key above many small items: quadratic).
    seen: dict[int, tuple[Any, str]] = {}  # id of a container already written -> its place

    def pointer(place: tuple[Any, str] | None) -> str:
        tokens = []
        while place is not None:
            place, token = place
            tokens.append(token)
        return "/".join(reversed(tokens))

    def walk(item: Any, place: tuple[Any, str]) -> Any:
        nonlocal budget, cut
        if budget <= 0:
            cut = True
            return marker
        if isinstance(item, (dict, list, tuple)):
            first = seen.get(id(item))
            if first is not None:
                ref = pointer(first)
                budget -= len(ref) + 12
                return {"$ref": ref}
            seen[id(item)] = place
        if isinstance(item, dict):
            out: dict[str, Any] = {}
            for key, sub in item.items():
                if budget <= 0:
                    out["..."] = marker
                    cut = True
                    break
                name = str(key)
                budget -= len(name) + 4
                out[name] = walk(sub, (place, _pointer_part(name)))
            return out
        if isinstance(item, (list, tuple)):
            seq: list[Any] = []
            for index, sub in enumerate(item):
                if budget <= 0:
                    seq.append(marker)
                    cut = True
                    break
                seq.append(walk(sub, (place, str(index))))
            return seq
        if item is None or isinstance(item, (bool, int, float)):
            budget -= 8
            return item
        text = item if isinstance(item, str) else str(item)  # dates, bytes: as text
        if len(text) > budget:
            cut = True
            text = text[: max(budget, 0)] + marker
        budget -= len(text) + 2
        return text

    return walk(value, (None, root)), cut


class _AdminServer:
    """One engine's admin endpoint: the connection count and the cached config dump.

    The supervisor of ``--workers N`` (:class:`.workers.WorkersAdmin`) reuses the bounded
    serving (:meth:`serve`) with its own :meth:`respond`.
    """

    def __init__(self, engine: Engine, settings: Admin) -> None:
        self.engine = engine
        self.stats = engine.stats
        self.settings = settings
        self.active = 0
        self._dump: bytes | None = None
        #: The reload ``_dump`` was built after (``None``: the configuration at start), and
        #: the engine's count of balancer rebuilds then (the clusters' ejected endpoints).
        self._dump_of: object = None
        self._dump_rebalances = -1
        #: Builds of ``_dump`` so far, when the last one was (loop time), and how long that
        #: took, in seconds.
        self._builds = 0
        self._built_at = float("-inf")
        self._build_cost = 0.0
        #: The engine's own dump sections (``Engine.dump_sections``) ``_dump`` was built with.
        self._sections: dict[str, Any] = {}
        self._page: bytes | None = None
        #: Recent totals for the live page, sampled by a timer (:class:`.admin_page.Sampler`).
        self.history = History()
        self._rejected = engine.stats.counter("metaprotocol_admin_connections_rejected_total")

    def _count(self, status: int) -> None:
        self.stats.counter("metaprotocol_admin_requests_total", code=str(status)).value += 1

    async def respond(self, method: str, target: str) -> bytes | Streamed:
        """The full HTTP response for one request (within ``admin.requestTimeout``), or the
        stats, sent piece by piece as they are made."""
        path, _, query = target.partition("?")
        if method == "GET" and path in STATS_PATHS:
            if "format=json" in query:
                parts = json_parts(self.engine.stats_snapshot_parts())
                return Streamed("application/json", parts)
            if query == WORKER_FORMAT:  # what the supervisor of --workers N reads
                return Streamed("text/plain; charset=utf-8", self.engine.worker_parts())
            return Streamed(PROMETHEUS, self.engine.prometheus_parts())
        if method == "GET" and path == "/config_dump":
            return await self._spaced_dump()
        return self.handle(method, target)

    async def _spaced_dump(self) -> bytes:
        """``/config_dump`` as of this request, its builds for a change of health spaced:
        one waits until :data:`DUMP_SPACING` times the last build's duration has passed
        since it (at most half of ``admin.requestTimeout``), so however fast the polls and
        the flaps, builds take about ``1 / (1 + DUMP_SPACING)`` of the loop. A dump built
        while this request waited (for another one) is served as it is."""
        builds = self._builds
        engine = self.engine
        # A reload's dump is built at once; one for a change of health waits its turn.
        if (
            self._dump is not None
            and self._dump_of is engine.last_reload
            and not self._dump_current()
        ):
            due = self._built_at + DUMP_SPACING * self._build_cost
            wait = min(due - asyncio.get_running_loop().time(), self.settings.request_timeout / 2)
            if wait > 0:
                await asyncio.sleep(wait)
                if self._builds != builds:
                    return self._dump
        return self.handle("GET", "/config_dump")

    def _sections_now(self) -> dict[str, Any]:
        return {key: section() for key, section in self.engine.dump_sections.items()}

    def _dump_current(self, sections: dict[str, Any] | None = None) -> bool:
        """Whether ``_dump`` shows the configuration and health of now."""
        engine = self.engine
        return (
            self._dump is not None
            and self._dump_of is engine.last_reload
            and self._dump_rebalances == engine.rebalances
            and (self._sections_now() if sections is None else sections) == self._sections
        )

    async def listen(self, host: str, port: int) -> asyncio.Server:
        """Serve on ``host:port``."""
        return await asyncio.start_server(self.serve, host, port, limit=MAX_REQUEST_BYTES)

    def handle(self, method: str, target: str) -> bytes:
        """The full HTTP response for one request."""
        engine = self.engine
        if method != "GET":
            return _response(405, "only GET is supported\n")
        path, _, query = target.partition("?")
        if path == "/ready":
            return _response(200, "LIVE\n") if engine.ready else _response(503, "DRAINING\n")
        if path == "/config_dump":
            # Built once per configuration: a reload (applied or refused) builds it again, and
            # so does a change of a section that changes by itself (the xDS client's state)
            # or of the clusters' health (an ejection or readmission since the last build).
            # Those sections are small next to the model and cheap to compare; rebuilt at every
            # request, the whole dump of a large configuration from a control plane (150 000
            # endpoints: 0.15 s) held the event loop once per request.
            sections = self._sections_now()
            if self._dump is None or not self._dump_current(sections):
                started = time.perf_counter()
                text = json.dumps(engine.config_dump(), indent=2, default=str) + "\n"
                self._dump = _response(200, text, "application/json")
                self._dump_of = engine.last_reload
                self._dump_rebalances = engine.rebalances
                self._sections = sections
                self._build_cost = time.perf_counter() - started
                self._built_at = asyncio.get_running_loop().time()
                self._builds += 1
            return self._dump
        if path in STATS_PATHS:
            if "format=json" in query:
                body = json.dumps(engine.stats_snapshot(), indent=2, sort_keys=True)
                return _response(200, body + "\n", "application/json")
            return _response(200, engine.prometheus(), PROMETHEUS)
        if path == "/stats/live":
            body = json.dumps(live_data(engine, self.history), default=str)
            return _response(200, body + "\n", "application/json")
        if path == "/":
            if self._page is None:
                self._page = _response(200, page_html(), "text/html; charset=utf-8")
            return self._page
        if path == "/paths":
            return _response(
                200,
                "/\n/paths\n/ready\n/config_dump\n/stats\n/stats?format=json\n/stats/prometheus\n"
                "/stats/live\n",
            )
        return _response(404, f"unknown path {path[:200]}; /paths lists the paths\n")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: at most one request, the whole exchange within the timeout."""
        if self.active >= self.settings.max_connections:
            self._rejected.value += 1
            writer.write(_BUSY)
            writer.close()
            return
        self.active += 1
        answered: list[bool] = []  # set once a response starts: nothing else may follow it
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                if await self._exchange(reader, writer, answered):
                    await _linger(reader, writer)
        except TimeoutError:
            if not answered:
                self._count(408)
                with contextlib.suppress(Exception):
                    writer.write(_TIMEOUT)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # The loop's end cancels what is left (a drained process exiting under a scrape):
            # ended, not raised, since Python 3.11's stream callback asks a cancelled task for
            # its exception, which raises, and the loop logs that with a traceback.
            pass
        except Exception as exc:  # a bug here must not print a traceback per request
            log.error("admin: %s: %s", type(exc).__name__, exc)
            if not answered:
                self._count(500)
                with contextlib.suppress(Exception):
                    writer.write(_INTERNAL)
        finally:
            self.active -= 1
            writer.close()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answered: list[bool]
    ) -> bool:
        """Read one request and answer it; True when the client may still be sending."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint  # 400, or 431 for a request over the bound
                self._count(status)
                answered.append(True)
                writer.write(_response(status, f"{exc}\n"))
                await writer.drain()
                return True
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(8192))
                continue
            if isinstance(event, h11.Request):
                target = event.target.decode("ascii", "replace")
                response = await self.respond(event.method.decode("ascii", "replace"), target)
                if isinstance(response, bytes):
                    self._count(int(response[9:12]))  # b"HTTP/1.1 200 ..."
                    answered.append(True)
                    writer.write(response)
                    await writer.drain()
                else:
                    # Piece by piece, the event loop running between them: the stats of
                    # maxStatsSeries series are hundreds of MB, and made and sent in one
                    # go they held every request for seconds (and took four copies).
                    self._count(200)
                    answered.append(True)
                    writer.write(response.head())
                    for part in response.parts:
                        writer.write(part.encode())
                        await writer.drain()  # a slow reader: admin.requestTimeout ends it
                        await asyncio.sleep(0)
                has_body = any(
                    name in (b"content-length", b"transfer-encoding") for name, _ in event.headers
                )
                return has_body
            return False  # the client closed (or paused) before a request


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the client is still sending (briefly, a bounded amount).

    Closing a socket with unread input sends a reset, which can destroy the response before
    the client reads it (a 431 to a 64 KiB request line, a 405 to a POST with a body).
    """
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_SECONDS):
            left = LINGER_BYTES
            while left > 0:
                data = await reader.read(min(left, 65536))
                if not data:
                    return
                left -= len(data)


async def start_admin(
    engine: Engine,
    settings: Admin,
    inherited: list[socket.socket] | None = None,
    serve: bool = True,
) -> asyncio.Server | ServerGroup:
    """Start the admin server on ``settings.bind``, or on the ``inherited`` sockets of a hot
    restart's predecessor; ``serve=False``: not accepting until ``start_serving``."""
    server = _AdminServer(engine, settings)
    if inherited:
        listening = await serve_on(
            inherited,
            lambda sock: asyncio.start_server(
                server.serve, sock=sock, limit=MAX_REQUEST_BYTES, start_serving=serve
            ),
        )
    else:
        listening = await asyncio.start_server(
            server.serve, *settings.bind, limit=MAX_REQUEST_BYTES, start_serving=serve
        )
    if serve:
        Sampler(listening, engine.stats, server.history)  # stops when the engine closes it
    else:
        engine.on_serving.append(lambda: Sampler(listening, engine.stats, server.history))
    return listening
