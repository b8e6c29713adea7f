"""The workload's Istio identity (``spec.meshIdentity``), from files, rotated without a reload.

istio-agent writes a non-Envoy workload's identity as files (``OUTPUT_CERTS`` for proxyless
gRPC, or file-mounted certificates): ``cert-chain.pem``, ``key.pem`` and ``root-cert.pem``,
renewed at about half of a certificate's life. :func:`load_identity` reads and checks them
(bounded, regular files only: the readers of :mod:`.tls`) and builds the contexts of
``ISTIO_MUTUAL``: the client one (the workload certificate, the mesh root, Istio's ALPN)
and a server one per listener settings. :class:`IdentityWatch` is the engine's: its
:meth:`~IdentityWatch.check`, from the engine's sweep every ``checkInterval``, stats the
three files (no read unless one changed) and swaps in new contexts for new connections;
open connections keep theirs. Files that cannot be used (a certificate and a key that do
not match, a file half written, a certificate that does not chain to the root or has
expired) keep the identity in force, and are counted and logged
once they stay so for a whole interval (istio-agent replaces the files one by one: a check
between two of its writes is not a failure).

ALPN: Istio sidecars offer ``istio-peer-exchange`` and ``istio``. The first makes a sidecar
speak Istio's TCP metadata exchange (a header of its own before the application's bytes).
The engine's listeners select it when offered, and as a client the engine offers both, as
istiod's ``ISTIO_MUTUAL`` clusters do (``ALPNInMeshWithMxc``); either side speaks the
exchange when it is selected (peer_exchange.py).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .tls import (
    TlsSettingError,
    _load_cas,
    _load_chain,
    _read_certificate,
    _read_key,
    certificate_expiry,
    certificate_uris,
    server_context,
)
from .tls_files import Stat, stat_of

if TYPE_CHECKING:
    from .config.models import ListenerTls, MeshIdentity
    from .stats import Labels, Stats

log = logging.getLogger("metaprotocol.proxy")

#: The ALPN protocols offered, in order (see the module's docstring).
ALPN = ("istio-peer-exchange", "istio")
#: Those of a cluster whose control plane turned the metadata exchange off (istiod's
#: ``ALPNInMesh``: ``UpstreamTls.peer_exchange`` false).
ALPN_WITHOUT_EXCHANGE = ("istio",)
#: The ALPN protocols accepted, the first a client offers (Istio's metadata exchange first,
#: as an Istio inbound listener's: see peer_exchange.py).
SERVER_ALPN = ("istio-peer-exchange", "istio")
#: The settings' file fields, in the order they are read.
FIELDS = ("certificateChain", "privateKey", "rootCertificates")
#: ``metaprotocol_tls_identity_rotations_total{result}``.
RESULTS = ("ok", "failed")

#: A file's identity as ``stat`` gives it (device, inode, size, mtime): istio-agent replaces
#: a file by a rename, Kubernetes a mounted secret by a symbolic link's.
Signature = tuple[Stat, ...]


class IdentityChanging(Exception):
    """The files changed while they were read: read again at the next check."""


def _paths(settings: MeshIdentity) -> tuple[str, str, str]:
    return settings.certificate_chain, settings.private_key, settings.root_certificates


def signature(settings: MeshIdentity) -> Signature:
    """The three files' :data:`Signature`; :class:`TlsSettingError` names one that is gone."""
    out = []
    for key, path in zip(FIELDS, _paths(settings), strict=True):
        try:
            out.append(stat_of(path))
        except OSError as exc:
            raise TlsSettingError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    return tuple(out)


#: A listener's server context settings: minimum and maximum version, cipher suites.
ServerKey = tuple[str, str | None, tuple[str, ...]]
DEFAULT_SERVER: ServerKey = ("TLSV1_2", None, ())
#: Server contexts an identity keeps, the most recently asked for (about 18 KB each, and each
#: rebuilt at every rotation): a control plane giving the inbound listener other TLS settings
#: at each update (``spec.xds.inboundListener``) made one more context each time, all kept
#: (700 updates: 12 MiB, and each rotation then stalled the event loop 0.8 s rebuilding them).
MAX_SERVER_CONTEXTS = 16


def istio_sni(host: str, port: int, subset: str | None) -> str:
    """The SNI istiod sets on an ``ISTIO_MUTUAL`` cluster without ``sni``:
    ``outbound_.<port>_.<subset>_.<host>`` (an empty subset for the service's own)."""
    return f"outbound_.{port}_.{subset or ''}_.{host}"


def server_key(tls: ListenerTls) -> ServerKey:
    """The settings of ``tls`` (an ``ISTIO_MUTUAL`` listener's) its context depends on."""
    return tls.min_protocol_version, tls.max_protocol_version, tls.cipher_suites


@dataclass
class IdentityMaterial:
    """One reading of the identity's files and the contexts built from it."""

    settings: MeshIdentity
    signature: Signature
    #: sha256 of the three files' bytes (``/config_dump`` shows its start).
    digest: str
    #: ``(path, notAfter)`` of the certificate chain and of the root.
    expiry: tuple[tuple[str, float], ...]
    #: The client context of ``ISTIO_MUTUAL`` clusters, and of those whose control plane
    #: offers no metadata exchange (ALPN ``istio`` alone).
    client: ssl.SSLContext
    client_without_exchange: ssl.SSLContext
    #: Server contexts of ``ISTIO_MUTUAL`` listeners, by their :data:`ServerKey`.
    servers: dict[ServerKey, ssl.SSLContext] = field(default_factory=dict)
    #: The URI SANs of the workload certificate (its SPIFFE id), for Istio's metrics.
    uris: tuple[str, ...] = ()
    #: Guards :attr:`servers`: an xDS update is translated in a thread, rotations on the loop.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def server_keys(self) -> tuple[ServerKey, ...]:
        """The keys of the server contexts kept (any thread may ask)."""
        with self._lock:
            return tuple(self.servers)

    def moved(self, settings: MeshIdentity) -> IdentityMaterial:
        """The same contexts, for the same files now at ``settings``' paths (built from a
        staging copy off the event loop, then written in place: ``spec.meshIdentity.sds``)."""
        paths = dict(zip(_paths(self.settings), _paths(settings), strict=True))
        with self._lock:
            servers = dict(self.servers)
        return IdentityMaterial(
            settings,
            signature(settings),
            self.digest,
            tuple((paths.get(path, path), expires) for path, expires in self.expiry),
            self.client,
            self.client_without_exchange,
            servers=servers,
            uris=self.uris,
        )

    def server(self, key: ServerKey) -> ssl.SSLContext:
        """The server context for listener settings ``key`` (built on first use; the
        :data:`MAX_SERVER_CONTEXTS` most recently asked for are kept)."""
        with self._lock:
            ctx = self.servers.pop(key, None)
        if ctx is None:
            ctx = _server(self.settings, key)
        with self._lock:
            self.servers[key] = ctx  # the most recent last
            while len(self.servers) > MAX_SERVER_CONTEXTS:
                del self.servers[next(iter(self.servers))]
        return ctx


def _renamed(exc: TlsSettingError) -> TlsSettingError:
    """An error of :func:`server_context` named by the identity's field."""
    names = {
        "serverCertificate": "certificateChain",
        "caCertificates": "rootCertificates",
    }
    return TlsSettingError(names.get(exc.key, exc.key), str(exc))


def _server(settings: MeshIdentity, key: ServerKey) -> ssl.SSLContext:
    """A listener's context: the workload certificate, client certificates required and
    chained to the mesh root, ALPN ``istio-peer-exchange`` (then ``istio``) selected when
    offered (a client offering none or others is served without ALPN)."""
    low, high, suites = key
    try:
        ctx, _, _ = server_context(
            "MUTUAL",
            server_certificate=settings.certificate_chain,
            private_key=settings.private_key,
            ca_certificates=settings.root_certificates,
            min_version=low,
            max_version=high,
            cipher_suites=suites,
        )
    except TlsSettingError as exc:
        raise _renamed(exc) from None
    ctx.set_alpn_protocols(list(SERVER_ALPN))
    return ctx


def _client(settings: MeshIdentity, alpn: tuple[str, ...] = ALPN) -> ssl.SSLContext:
    """The context of ``ISTIO_MUTUAL`` clusters: the workload certificate, the server's
    chained to the mesh root. Its names are checked after the handshake (against
    ``subjectAltNames``), never against the SNI: Istio's SNI (``outbound_.<port>_...``) is
    a routing key, not a name in the server's certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_cas(ctx, "rootCertificates", settings.root_certificates)
    _load_chain(
        ctx, "certificateChain", settings.certificate_chain, "privateKey", settings.private_key
    )
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def load_identity(
    settings: MeshIdentity, servers: Iterable[ServerKey] = (DEFAULT_SERVER,)
) -> IdentityMaterial:
    """Read and check the files, and build the contexts (the client one, a server one per
    key of ``servers``). :class:`TlsSettingError` names a field whose file cannot be used;
    :class:`IdentityChanging` (or an ``OSError`` of OpenSSL's own read): a file changed
    while it was read."""
    before = signature(settings)
    chain, key, root = _paths(settings)
    digest = hashlib.sha256()
    for data in (
        _read_certificate("certificateChain", chain),
        _read_key("privateKey", key),
        _read_certificate("rootCertificates", root),
    ):
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    material = IdentityMaterial(
        settings,
        before,
        digest.hexdigest(),
        tuple(
            (path, expires)
            for path in (chain, root)
            if (expires := certificate_expiry(path)) is not None
        ),
        _client(settings),
        _client(settings, ALPN_WITHOUT_EXCHANGE),
        uris=certificate_uris(chain),
    )
    for server in servers:
        material.server(server)
    _check_chain(material)
    if signature(settings) != before:
        raise IdentityChanging()
    return material


#: OpenSSL's ``X509_V_ERR_CERT_NOT_YET_VALID``: a clock behind the CA's is no fault of the files.
_NOT_YET_VALID = 9


def _check_chain(material: IdentityMaterial) -> None:
    """:class:`TlsSettingError` unless the certificate chains to the root and is not expired:
    what every peer checks. A handshake in memory between the identity's own client and
    server contexts, each verifying the other's certificate (the identity's)."""
    settings = material.settings
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = material.client.wrap_bio(bios[0], bios[1])
    server = material.server(DEFAULT_SERVER).wrap_bio(bios[2], bios[3], server_side=True)
    done = [False, False]
    try:
        for _ in range(8):
            for i, side in enumerate((client, server)):
                if not done[i]:
                    try:
                        side.do_handshake()
                        done[i] = True
                    except ssl.SSLWantReadError:
                        pass
            bios[2].write(bios[1].read())
            bios[0].write(bios[3].read())
            if all(done):
                return
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code == _NOT_YET_VALID:
            return
        why = exc.verify_message
    except ssl.SSLError as exc:
        why = str(exc)
    else:
        why = "the handshake did not complete"
    raise TlsSettingError(
        "certificateChain",
        f"{settings.certificate_chain} cannot be used with the root of "
        f"{settings.root_certificates}: {why}",
    )


class IdentityWatch:
    """The engine's identity: the material in force, and its rotation (:meth:`check`)."""

    def __init__(self, material: IdentityMaterial, stats: Stats, now: float) -> None:
        self.settings = material.settings
        self.material = material
        self.interval = material.settings.check_interval
        #: When the files are looked at next (the event loop's clock).
        self.next_check = now + self.interval
        #: Files that failed once: reported if they are the same at the next check.
        self._suspect: Signature | None = None
        #: Files reported as unusable (not read again until they change).
        self._reported: Signature | None = None
        #: Why the last rotation failed (``None``: it did not), for ``/config_dump``.
        self.last_error: str | None = None
        self._rotated = stats.counter("metaprotocol_tls_identity_rotations_total", result="ok")
        self._failed = stats.counter("metaprotocol_tls_identity_rotations_total", result="failed")
        #: Called after a rotation (the engine gives its listeners the new contexts).
        self.on_rotate: Callable[[], None] | None = None
        #: ``/config_dump``'s view of the SDS stream the identity comes from, if any.
        self.source_dump: Callable[[], dict[str, object]] | None = None

    def check(self, now: float) -> None:
        """Look at the files (a ``stat`` of each); if they changed, read them and swap in
        their contexts, or keep the ones in force and report why they cannot be used."""
        self.next_check = now + self.interval
        gone: TlsSettingError | None = None
        try:
            current = signature(self.settings)
        except TlsSettingError as exc:  # a file is gone: () stands for that state
            current, gone = (), exc
        if current == self.material.signature or current == self._reported:
            self._suspect = None
            return
        try:
            if gone is not None:
                raise gone
            material = load_identity(self.settings, tuple(self.material.servers))
        except (IdentityChanging, OSError):  # being replaced: again at the next sweep
            self.next_check = now
            return
        except TlsSettingError as exc:
            self._failed_with(current, exc)
            return
        self.adopt(material)

    def adopt(self, material: IdentityMaterial) -> None:
        """Serve ``material`` from now on (read by :meth:`check`, or built off the loop from
        the files now in place: ``spec.meshIdentity.sds``)."""
        self.material = material
        self._suspect = self._reported = None
        self.last_error = None
        self._rotated.value += 1
        log.info(
            "mesh identity rotated: %s (expires %s)",
            self.settings.certificate_chain,
            ", ".join(f"{path} at {int(t)}" for path, t in material.expiry) or "unknown",
        )
        if self.on_rotate is not None:
            self.on_rotate()

    def refused(self, reason: str) -> None:
        """An identity pushed (``spec.meshIdentity.sds``) that cannot be used: counted, shown,
        the one in force kept."""
        self.last_error = reason
        self._failed.value += 1

    def _failed_with(self, files: Signature, exc: TlsSettingError) -> None:
        if files != self._suspect:
            self._suspect = files  # maybe between two of istio-agent's writes: look again
            return
        self._suspect = None
        self._reported = files
        self.last_error = f"spec.meshIdentity.{exc.key}: {exc}"
        self._failed.value += 1
        log.warning("mesh identity not rotated, the one in force is kept: %s", self.last_error)

    def expiry_series(self) -> Iterable[tuple[Labels, int]]:
        """``metaprotocol_tls_certificate_expiry_seconds{identity="mesh", certificate}``."""
        for path, expires in self.material.expiry:
            yield (("identity", "mesh"), ("certificate", path)), int(expires)

    def dump(self) -> dict[str, object]:
        """For ``/config_dump``: paths, never what the files hold."""
        settings = self.settings
        if self.source_dump is not None:
            return {
                "sds": self.source_dump(),
                "filesDigest": self.material.digest[:12],
                "certificateExpiry": dict(self.material.expiry),
                "lastRotationError": self.last_error,
            }
        return {
            "certificateChain": settings.certificate_chain,
            "privateKey": settings.private_key,
            "rootCertificates": settings.root_certificates,
            "checkInterval": settings.check_interval,
            "filesDigest": self.material.digest[:12],
            "certificateExpiry": dict(self.material.expiry),
            "lastRotationError": self.last_error,
        }
