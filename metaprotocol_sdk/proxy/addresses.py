"""Which addresses reach a bound listener: names resolved (bounded in time), local addresses.

Used once at start to refuse an endpoint that is the engine's own listener, however it is
written: ``127.0.0.1``, ``localhost``, a name resolving to a bound address, or one of the
machine's own addresses behind a wildcard bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterable

log = logging.getLogger("metaprotocol.proxy")

#: Longest wait, in all, for endpoint names to resolve at start.
RESOLVE_TIMEOUT = 2.0


def port_number(text: str) -> int | None:
    """The number a port written as text names: ASCII digits, at most five (``None`` for any
    other text, whatever its value). ``str.isdigit`` also takes other scripts' digits
    (fullwidth ones, Arabic-Indic ones), and ``int`` refuses more than 4300 digits with a
    ``ValueError``."""
    if not (0 < len(text) <= 5 and text.isascii() and text.isdigit()):
        return None
    return int(text)


def _literal(address: str) -> str | None:
    """The canonical text of an IP literal (``::1`` for ``0::1``), ``None`` for a name."""
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        return None


async def _lookup(loop: asyncio.AbstractEventLoop, name: str) -> set[str]:
    infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return {literal for info in infos if (literal := _literal(str(info[4][0]))) is not None}


async def resolve_all(
    loop: asyncio.AbstractEventLoop, names: Iterable[str], timeout: float = RESOLVE_TIMEOUT
) -> dict[str, set[str]]:
    """The IP addresses of each of ``names`` (IP literals map to themselves).

    Names are resolved at once, in parallel, and together within ``timeout`` seconds; a name
    that fails or is not resolved in time maps to no address (and is logged once): the
    check it serves cannot see it, and connecting to it later fails or succeeds on its own.
    """
    out: dict[str, set[str]] = {}
    tasks: dict[asyncio.Task[set[str]], str] = {}
    for name in set(names):
        literal = _literal(name)
        out[name] = set() if literal is None else {literal}
        if literal is None:
            tasks[asyncio.ensure_future(_lookup(loop, name))] = name
    if not tasks:
        return out
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
        log.warning(
            "endpoint %s did not resolve within %.1f s: not checked against the listeners",
            tasks[task],
            timeout,
        )
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for task in done:
        try:
            out[tasks[task]] = task.result()
        except OSError as exc:
            log.warning("endpoint %s does not resolve (%s)", tasks[task], exc.strerror or exc)
    return out


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (``127.0.0.0/8``, ``::1``)."""
    literal = _literal(host)
    if literal is None:
        return host == "localhost"
    return ipaddress.ip_address(literal).is_loopback


def is_local(address: str) -> bool:
    """True when ``address`` (an IP literal) belongs to this machine.

    Binding a socket to it succeeds only then (``EADDRNOTAVAIL`` otherwise); nothing is sent.
    """
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def reaches(address: str, bound_ip: str) -> bool:
    """True when connecting to ``address`` (an IP literal) reaches a socket bound on ``bound_ip``.

    A wildcard bind (``0.0.0.0``, ``::``) accepts on every local address; ``::`` also takes
    IPv4 (Linux's default dual stack).
    """
    if address == bound_ip:
        return True
    ip = ipaddress.ip_address(address)
    if bound_ip == "0.0.0.0":
        return ip.version == 4 and is_local(address)
    if bound_ip == "::":
        return is_local(address)
    return False
