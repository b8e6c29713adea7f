"""The TLS files a configuration reads, and whether they changed since they were read.

A listener's or a DestinationRule's ``tls`` names its certificate, key, CAs and CRL by path,
and the loader reads them once. Kubernetes updates a mounted Secret in place (cert-manager
renewing a certificate, say) and nothing tells the engine: it served the old certificate
until a reload, up to its expiry. ``metaprotocol proxy`` looks at these files every
``spec.tlsFiles.checkInterval`` (a ``stat`` of each, nothing read unless one changed) and
reloads its configuration when one did (``metaprotocol_reloads_total{source="tls_files"}``):
the reload reads and checks them as any reload does, and a pair caught half-written is
refused, the files in force kept, and tried again when they change next.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

from .config.models import Config, TrafficPolicy


class Stat(NamedTuple):
    """A file's identity as ``stat`` gives it: a rename or a write changes it."""

    device: int
    inode: int
    size: int
    mtime_ns: int


#: A file's :class:`Stat` (``None``: missing).
FileSignature = Stat | None


def _policies(config: Config) -> Iterator[TrafficPolicy]:
    for rule in config.destination_rules.values():
        yield rule.policy
        yield from rule.ports.values()
        for subset in rule.subsets.values():
            yield subset.policy
            yield from subset.ports.values()


def tls_paths(config: Config) -> tuple[str, ...]:
    """Every certificate, key, CA and CRL file ``config``'s listeners and DestinationRules
    read (not the mesh identity's, which the engine follows itself), sorted."""
    paths: set[str] = set()
    for listener in config.proxy.listeners:
        served = listener.tls
        if served is not None and served.mode != "ISTIO_MUTUAL":
            paths.update((served.server_certificate, served.private_key))
            paths.update(p for p in (served.ca_certificates, served.ca_crl) if p)
    for policy in _policies(config):
        sent = policy.tls
        if sent is not None and sent.mode != "ISTIO_MUTUAL":
            files = (sent.client_certificate, sent.private_key, sent.ca_certificates, sent.ca_crl)
            paths.update(p for p in files if p)
    return tuple(sorted(paths))


def signatures(paths: tuple[str, ...]) -> tuple[FileSignature, ...]:
    """The :data:`FileSignature` of each of ``paths`` (a symbolic link followed, as a
    Secret's mount makes them)."""
    out: list[FileSignature] = []
    for path in paths:
        try:
            out.append(stat_of(path))
        except OSError:
            out.append(None)
    return tuple(out)


def stat_of(path: str) -> Stat:
    """``path``'s :class:`Stat` (``OSError`` when it cannot be had)."""
    st = os.stat(path)
    return Stat(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
