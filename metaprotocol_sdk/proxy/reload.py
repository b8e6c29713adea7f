"""Configuration reloads: what may change while serving, versions, and the reload record.

The engine (:meth:`Engine.apply <metaprotocol_sdk.proxy.engine.Engine.apply>`) builds every
runtime structure of a new configuration next to the serving one, and swaps only when all
of it succeeded. This module holds the rules it checks first and the values it reports.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from .config.models import (
    Config,
    ConnectionPool,
    LoadBalancer,
    OutlierDetection,
    Protocol,
    ProxyProtocol,
    ProxySettings,
    RetryBudget,
    Tunnel,
    UpstreamTls,
)
from .stats import HELP

HELP.setdefault(
    "metaprotocol_reloads_total", "Configuration reloads, by source and result (ok, refused)."
)

#: Reload results counted in ``metaprotocol_reloads_total{result}``.
RESULTS = ("ok", "refused")

#: ``ProxyConfig`` settings that a reload cannot change (the engine reads them once, at
#: start): a reload that changes one is refused and names it; restart the process instead.
RESTART_NEEDED = {
    "admin": "spec.admin",
    "limits": "spec.limits",
    "overload": "spec.overload",
    "timeouts": "spec.timeouts",
    "watchdog": "spec.watchdog",
    "access_log": "spec.accessLog",
    "connections_per_endpoint": "spec.upstream.connectionsPerEndpoint",
    "telemetry": "spec.telemetry",
    "tracing": "spec.tracing",
}

#: Bytes of the documents hashed into a version (beyond, a marker: see ``bounded_copy``).
VERSION_DOCUMENT_BYTES = 4 * 1024 * 1024


def restart_needed(serving: ProxySettings, new: ProxySettings) -> str | None:
    """Why ``new`` cannot replace ``serving`` while serving (``None``: it can)."""
    changed = [
        field
        for attr, field in RESTART_NEEDED.items()
        if getattr(serving, attr) != getattr(new, attr)
    ]
    if not changed:
        return None
    return (
        f"{', '.join(changed)} changed: these settings apply at start only (restart needed); "
        "nothing was changed"
    )


def config_version(config: Config) -> str:
    """A short content hash of the configuration's documents (12 hex digits of sha256).

    The documents are copied with the dump's bound first: YAML aliases are shared
    references, and expanding them unbounded is how a 1 KB file becomes hundreds of MB.
    """
    from .admin import bounded_copy

    documents, _ = bounded_copy(list(config.documents), VERSION_DOCUMENT_BYTES, "/documents")
    # The same text as json.dumps, in pieces: json.dumps encodes in C in one call, holding
    # the GIL throughout (0.1 s for 12 000 routes), so the event loop waited for a reload
    # hashing its configuration in a thread.
    digest = hashlib.sha256()
    encoder = json.JSONEncoder(sort_keys=True, default=str, separators=(",", ":"))
    for piece in encoder.iterencode(documents):
        digest.update(piece.encode())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class ClusterSpec:
    """What a cluster is built from: a reload keeps a cluster (its connections, its outlier
    state) when its spec is unchanged, and drains it otherwise."""

    protocol: Protocol
    #: (address, port, sorted labels, weight, failover priority) of each endpoint.
    endpoints: tuple[tuple[str, int, tuple[tuple[str, str], ...], int, int], ...]
    policy: LoadBalancer
    pool: ConnectionPool | None
    outlier: OutlierDetection | None
    namespace: str
    #: Compared with the files' digest: a rotated certificate makes a changed cluster.
    tls: UpstreamTls | None = None
    #: Automatic mutual TLS: whether each endpoint gets ``ISTIO_MUTUAL`` (``None``: all
    #: connections are as ``tls`` says).
    mutual: tuple[bool, ...] | None = None
    #: Locality weighted balancing: each endpoint's (locality, locality weight).
    localities: tuple[tuple[str, int], ...] | None = None
    #: ``trafficPolicy.retryBudget``: a changed budget makes a changed cluster.
    retry_budget: RetryBudget | None = None
    #: ``trafficPolicy.proxyProtocol``: a changed header makes a changed cluster.
    proxy_protocol: ProxyProtocol | None = None
    #: ``trafficPolicy.tunnel``: a changed tunnel makes a changed cluster.
    tunnel: Tunnel | None = None


@dataclass(frozen=True)
class ReloadRecord:
    """The last reload: where it came from, ``ok`` or ``refused``, why, and when."""

    source: str
    result: str
    error: str | None
    #: Unix time of the reload.
    time: float
    #: The version the reload would have served (``ok``: the one serving now).
    version: str

    @classmethod
    def now(cls, source: str, result: str, error: str | None, version: str) -> ReloadRecord:
        """A record stamped with the current time."""
        return cls(source, result, error, time.time(), version)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``/config_dump``'s ``lastReload``."""
        return {
            "source": self.source,
            "result": self.result,
            "error": self.error,
            "time": self.time,
            "version": self.version,
        }
