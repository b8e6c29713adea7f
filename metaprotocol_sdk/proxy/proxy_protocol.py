"""The PROXY protocol header an upstream connection starts with (``trafficPolicy.proxyProtocol``).

HAProxy's ``proxy-protocol.txt`` defines it: before anything else on the connection (before a
TLS handshake too), the proxy writes the address and port of the client it carries and the
address and port that client connected to, in text (version 1) or binary (version 2). Both
addresses are of one family: ``TCP4`` / ``TCP6`` (v1), ``AF_INET`` / ``AF_INET6`` over
``STREAM`` (v2). A client without such addresses (not over TCP/IP) is sent as the spec says
for an unknown origin: v1 ``PROXY UNKNOWN``, v2 the ``LOCAL`` command with no addresses.

One header names one client, so a cluster with it gives each client connections of its own
(dedicated pooling, see upstream.py), as Envoy keys its pools by the header's addresses.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .downstream import Downstream

#: Version 2's 12-byte signature.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY, _V2_LOCAL = 0x21, 0x20  # version 2 in the high nibble, the command in the low one
_V2_TCP4, _V2_TCP6 = 0x11, 0x21  # the address family in the high nibble, STREAM in the low one
_V2_PORTS = struct.Struct("!HH")
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_LOCAL = V2_SIGNATURE + bytes((_V2_LOCAL, 0, 0, 0))

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def _ip_port(name: Any) -> Address | None:
    """The IP address and port of a socket's ``peername`` or ``sockname`` (``None``: not an
    IP socket's, e.g. a Unix socket's path, or not known). An IPv6 zone is dropped: neither
    header can carry it."""
    if not isinstance(name, tuple) or len(name) < 2:
        return None
    host, port = name[0], name[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        return ipaddress.ip_address(host.partition("%")[0]), port
    except ValueError:
        return None


def header(version: int, source: Address | None, destination: Address | None) -> bytes:
    """The header of ``version`` (1 or 2) for a client at ``source`` that connected to
    ``destination``; the unknown origin's when either is missing or their families differ."""
    known = (
        source is not None
        and destination is not None
        and source[0].version == destination[0].version
    )
    if version == 1:
        if not known:
            return V1_UNKNOWN
        assert source is not None and destination is not None
        family = "TCP4" if source[0].version == 4 else "TCP6"
        line = f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
        return line.encode("ascii")
    if not known:
        return V2_LOCAL
    assert source is not None and destination is not None
    addresses = source[0].packed + destination[0].packed + _V2_PORTS.pack(source[1], destination[1])
    kind = _V2_TCP4 if source[0].version == 4 else _V2_TCP6
    return V2_SIGNATURE + bytes((_V2_PROXY, kind)) + struct.pack("!H", len(addresses)) + addresses


def client_header(version: int, client: Downstream | None) -> bytes:
    """The header naming ``client`` (its address and the one it connected to, read from
    its socket); the unknown origin's without a client or its addresses."""
    transport = None if client is None else client.transport
    if transport is None:
        return header(version, None, None)
    return header(
        version,
        _ip_port(transport.get_extra_info("peername")),
        _ip_port(transport.get_extra_info("sockname")),
    )
