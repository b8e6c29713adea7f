"""TLS: contexts built from the configuration's PEM files, and both ends' handshakes.

A listener or a cluster without ``tls`` never reaches this module: its connections are the
plain ``Downstream`` and ``UpstreamConnection`` they always were. With ``tls``:

* **downstream** (termination): each accepted connection gets the event loop's own TLS
  layer (:func:`tls_accept`) under a :class:`TlsDownstream`, which counts against
  ``limits.maxConnections`` while it shakes hands; the handshake is bounded by
  ``timeouts.handshake`` (asyncio's ``ssl_handshake_timeout``) and its outcome counted by a
  bounded set of reasons. A failed handshake is closed and counted, never logged.
* **upstream** (origination): :class:`TlsUpstreamConnection` opens the connection with the
  cluster's context; a failed handshake or a server certificate whose names match none of
  ``subjectAltNames`` is an upstream connect failure like a refused connect, with the reason
  in the local reply's message.

The files are read once per load (:func:`client_context`, :func:`server_context`): a missing,
unreadable or invalid file is a configuration error naming the field, and a reload reads
them again, so a rotated certificate applies to new connections.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from .authorization import ascii_lower, uris_of
from .downstream import Downstream, ListenerRuntime, Refused
from .handshake import HalfClosing, handshake_class
from .peer_exchange import ALPN as PEER_EXCHANGE
from .peer_exchange import PeerExchange, UpstreamExchange
from .stats import Counter, Labels
from .telemetry import TcpSeries
from .tunnel import TunnelRefused, connect_error, hand_over, open_tunnel
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .config.models import ListenerTls, UpstreamTls
    from .identity import IdentityWatch
    from .stats import Stats
    from .telemetry import IstioTelemetry
    from .upstream import Cluster, UpstreamHost

log = logging.getLogger("metaprotocol.proxy")

#: Largest PEM file read (a system CA bundle is about 220 KiB).
MAX_PEM_BYTES = 1 << 20
#: ``metaprotocol_tls_handshake_errors_total{reason}``: a bounded set.
HANDSHAKE_ERRORS = (
    "timeout",  # not done within timeouts.handshake (listeners) or the connect timeout
    "not_tls",  # plain text or garbage where a ClientHello (or ServerHello) belongs
    "protocol_version",  # no TLS version both sides accept
    "no_shared_cipher",
    "no_client_certificate",  # MUTUAL listener, the client sent none
    "bad_certificate",  # the peer's certificate failed verification (chain, dates, names)
    "peer_rejected",  # the peer sent an alert (it refused our certificate, say)
    "closed",  # the peer closed or reset the connection mid-handshake
    "error",  # anything else
)
#: ``minProtocolVersion`` / ``maxProtocolVersion`` values.
PROTOCOL_VERSIONS = {"TLSV1_2": ssl.TLSVersion.TLSv1_2, "TLSV1_3": ssl.TLSVersion.TLSv1_3}
_NOT_TLS = frozenset(
    (
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "UNKNOWN_PROTOCOL",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LENGTH_MISMATCH",
        "RECORD_LAYER_FAILURE",
        "WRONG_SSL_VERSION",
        "UNEXPECTED_MESSAGE",
        "UNEXPECTED_RECORD",
        "BAD_PACKET_LENGTH",
        "LENGTH_MISMATCH",
        "DECODE_ERROR",
        "BAD_RECORD_TYPE",
        "EXCESSIVE_MESSAGE_SIZE",
        "BAD_EXTENSION",
        "BAD_HANDSHAKE_LENGTH",
    )
)
_VERSION = frozenset(
    ("UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW", "VERSION_TOO_HIGH", "TLSV1_ALERT_PROTOCOL_VERSION")
)


class TlsSettingError(ValueError):
    """A ``tls`` setting that cannot be used; ``key`` is the field (``caCertificates``)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        super().__init__(reason)


# -- files and contexts ------------------------------------------------------------------------


def _read_pem(key: str, path: str, marker: bytes, what: str) -> bytes:
    """The bytes of the PEM file ``path`` (field ``key``), which must hold ``marker``.

    Only a regular file is read: a FIFO nobody writes to would block the load for good (and
    a device such as ``/dev/zero`` never ends); the open does not wait for a writer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TlsSettingError(key, f"no such file: {path}") from None
    except OSError as exc:
        raise TlsSettingError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise TlsSettingError(key, f"{path} is a directory, not a PEM file")
        if not stat.S_ISREG(mode):
            raise TlsSettingError(key, f"{path} is not a regular file (a FIFO or a device)")
        try:
            data = f.read(MAX_PEM_BYTES + 1)
        except OSError as exc:
            raise TlsSettingError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsSettingError(key, f"{path} is larger than the limit of {MAX_PEM_BYTES} bytes")
    if marker not in data:
        raise TlsSettingError(key, f"{path} holds no PEM {what} ({marker.decode()!r} not found)")
    return data


def _read_certificate(key: str, path: str) -> bytes:
    return _read_pem(key, path, b"-----BEGIN CERTIFICATE-----", "certificate")


def _read_key(key: str, path: str) -> bytes:
    data = _read_pem(key, path, b"PRIVATE KEY-----", "private key")
    if b"ENCRYPTED" in data:
        raise TlsSettingError(
            key,
            f"{path} is an encrypted private key; no passphrase can be given here: store it "
            "decrypted (openssl pkey -in KEY -out PLAIN) with file permissions protecting it",
        )
    return data


def _no_passphrase() -> bytes:
    """Given to ``load_cert_chain``: OpenSSL would otherwise prompt on the terminal."""
    raise TlsSettingError("privateKey", "the private key asks for a passphrase")


def _decoded_certificate(path: str | None) -> dict[str, Any] | None:
    """The first certificate of ``path`` as ``getpeercert()`` decodes one (``None``: no file,
    unreadable, or a Python build without CPython's own decoder, also used by its tests)."""
    import _ssl

    decode = getattr(_ssl, "_test_decode_cert", None)
    if decode is None or path is None:
        return None
    try:
        decoded = decode(path)
    except (ssl.SSLError, OSError, ValueError):
        return None
    return decoded if isinstance(decoded, dict) else None


def certificate_expiry(path: str) -> float | None:
    """When the first certificate of ``path`` expires (Unix seconds); ``None`` when the
    Python build cannot tell."""
    not_after = (_decoded_certificate(path) or {}).get("notAfter")
    try:
        return float(ssl.cert_time_to_seconds(not_after)) if not_after else None
    except ValueError:
        return None


def certificate_uris(path: str | None) -> tuple[str, ...]:
    """The URI SANs of the first certificate of ``path`` (``()``: none, no file, or a
    Python build that cannot tell), read once when a listener or cluster is built: Istio's
    metrics name the local identity by them."""
    return uris_of(_decoded_certificate(path))


def _load_chain(ctx: ssl.SSLContext, cert_key: str, cert: str, key_key: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except TlsSettingError as refused:  # (two names: mypyc types each clause's own)
        raise TlsSettingError(key_key, f"{key}: {refused}") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsSettingError(key_key, f"{key} is not the key of {cert}") from None
        raise TlsSettingError(cert_key, f"{cert} and {key} cannot be used: {exc}") from None


def _load_cas(ctx: ssl.SSLContext, key: str, path: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise TlsSettingError(key, f"{path} cannot be used as CA certificates: {exc}") from None


class _Files:
    """The files a context is built from: their digest and certificates' expiry."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.expiry: list[tuple[str, float]] = []

    def add(self, data: bytes, path: str | None = None) -> None:
        self.hash.update(len(data).to_bytes(8, "big"))
        self.hash.update(data)
        if path is not None:
            expires = certificate_expiry(path)
            if expires is not None:
                self.expiry.append((path, expires))


def client_context(
    mode: str,
    *,
    ca_certificates: str | None,
    client_certificate: str | None,
    private_key: str | None,
    subject_alt_names: tuple[str, ...],
    insecure_skip_verify: bool,
    ca_crl: str | None,
) -> tuple[ssl.SSLContext, str, tuple[tuple[str, float], ...]]:
    """The context of a DestinationRule's ``tls`` (``SIMPLE`` or ``MUTUAL``), the digest of
    its files and their certificates' expiry; :class:`TlsSettingError` names a bad field.

    The server's chain is verified against ``caCertificates`` (the system's trust store when
    unset), then its names: one of ``subjectAltNames`` (checked after the handshake), or else
    the SNI sent (by OpenSSL, during it). ``insecureSkipVerify`` verifies nothing.
    """
    files = _Files()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = not subject_alt_names
        if ca_certificates is not None:
            files.add(_read_certificate("caCertificates", ca_certificates), ca_certificates)
            _load_cas(ctx, "caCertificates", ca_certificates)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if ca_crl is not None:
            files.add(_read_pem("caCrl", ca_crl, b"-----BEGIN X509 CRL-----", "CRL"))
            _load_cas(ctx, "caCrl", ca_crl)  # OpenSSL's store takes CRLs from a file too
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    if mode == "MUTUAL":
        if client_certificate is None:
            raise TlsSettingError("clientCertificate", "required with mode MUTUAL")
        if private_key is None:
            raise TlsSettingError("privateKey", "required with mode MUTUAL")
        files.add(_read_certificate("clientCertificate", client_certificate), client_certificate)
        files.add(_read_key("privateKey", private_key))
        _load_chain(ctx, "clientCertificate", client_certificate, "privateKey", private_key)
    return ctx, files.hash.hexdigest(), tuple(files.expiry)


def _keep_sni(ssl_object: Any, name: str | None, _context: ssl.SSLContext) -> None:
    """Keep the SNI a client sent on its TLS object (a server's ``server_hostname`` is
    always ``None``): what ``connection.sni`` of an AuthorizationPolicy reads, in lower case
    as Envoy keeps it (``setRequestedServerName``: a host name's case is no part of it)."""
    if name is not None and isinstance(ssl_object, HalfClosing):
        ssl_object.sni = ascii_lower(name)


def server_context(
    mode: str,
    *,
    server_certificate: str,
    private_key: str,
    ca_certificates: str | None,
    min_version: str,
    max_version: str | None,
    cipher_suites: tuple[str, ...],
    ca_crl: str | None = None,
) -> tuple[ssl.SSLContext, str, tuple[tuple[str, float], ...]]:
    """The context of a listener's ``tls``, the digest of its files and their certificates'
    expiry; :class:`TlsSettingError` names a bad field. A client certificate's chain is
    verified by OpenSSL during the handshake (against ``caCrl`` too: a CRL of each CA of the
    chain, as Envoy's default); its names and pins after it (:class:`ClientCheck`)."""
    files = _Files()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # a client renegotiating is CPU it spends on us
    ctx.sslobject_class = HalfClosing  # alerts a client can read; close_notify a half-close
    ctx.sni_callback = _keep_sni  # (AuthorizationPolicy's connection.sni)
    ctx.minimum_version = PROTOCOL_VERSIONS[min_version]
    if max_version is not None:
        ctx.maximum_version = PROTOCOL_VERSIONS[max_version]
    files.add(_read_certificate("serverCertificate", server_certificate), server_certificate)
    files.add(_read_key("privateKey", private_key))
    _load_chain(ctx, "serverCertificate", server_certificate, "privateKey", private_key)
    if mode in ("MUTUAL", "OPTIONAL_MUTUAL"):
        if ca_certificates is None:
            raise TlsSettingError("caCertificates", f"required with mode {mode}")
        files.add(_read_certificate("caCertificates", ca_certificates), ca_certificates)
        _load_cas(ctx, "caCertificates", ca_certificates)
        ctx.verify_mode = ssl.CERT_REQUIRED if mode == "MUTUAL" else ssl.CERT_OPTIONAL
        if ca_crl is not None:
            files.add(_read_pem("caCrl", ca_crl, b"-----BEGIN X509 CRL-----", "CRL"))
            _load_cas(ctx, "caCrl", ca_crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    if cipher_suites:
        try:
            ctx.set_ciphers(":".join(cipher_suites))
        except ssl.SSLError:
            raise TlsSettingError(
                "cipherSuites",
                f"no cipher suite of {', '.join(cipher_suites)} is known to OpenSSL "
                f"{ssl.OPENSSL_VERSION.split()[1]}",
            ) from None
    return ctx, files.hash.hexdigest(), tuple(files.expiry)


# -- names and reasons ---------------------------------------------------------------------


def server_name_error(name: str) -> str | None:
    """Why ``name`` cannot be sent as the SNI (``None``: it can), as the TLS layer would
    refuse it: an empty label or one longer than 63 characters, a NUL."""
    why = "a NUL character" if "\0" in name else None
    try:
        name.encode("idna")
    except UnicodeError as exc:
        why = str(exc.__cause__ or exc)
    if not name:
        why = "empty"
    return None if why is None else f"{name!r} cannot be sent as a server name: {why}"


def _name_matches(kind: str, value: str, name: str) -> bool:
    """Whether the certificate's SAN ``kind: value`` is ``name`` (Envoy's exact matcher: a
    DNS SAN ``*.example.com`` stands for one label)."""
    if kind == "DNS":
        value, name = value.lower().rstrip("."), name.lower().rstrip(".")
        if value == name:
            return True
        if value.startswith("*."):
            label, _, rest = name.partition(".")
            return bool(label) and rest == value[2:]
        return False
    if kind == "IP Address":
        try:
            return ipaddress.ip_address(value.strip()) == ipaddress.ip_address(name)
        except ValueError:
            return False
    return kind == "URI" and value == name


def san_mismatch(peercert: dict[str, Any] | None, names: Iterable[str]) -> str | None:
    """Why a verified certificate does not name any of ``names`` (``None``: one)."""
    sans = tuple((peercert or {}).get("subjectAltName", ()))
    wanted = tuple(names)
    for kind, value in sans:
        if any(_name_matches(kind, value, name) for name in wanted):
            return None
    present = ", ".join(f"{kind}:{value}" for kind, value in sans) or "none"
    return (
        f"certificate verify failed: its subject alt names ({present}) match none of "
        f"subjectAltNames ({', '.join(wanted)})"
    )


#: The SAN kinds (as ``getpeercert()`` names them) Envoy's ``match_subject_alt_names`` reads.
_PREFIX_SANS = frozenset({"DNS", "URI", "email", "IP Address"})


def san_prefix_mismatch(peercert: dict[str, Any] | None, prefixes: tuple[str, ...]) -> str | None:
    """Why a verified certificate has no SAN starting with one of ``prefixes`` (Envoy's
    ``match_subject_alt_names`` prefix matchers: istiod's trust domains; like Envoy, a DNS,
    URI, email or IP address SAN may match); ``None``: it has."""
    sans = tuple((peercert or {}).get("subjectAltName", ()))
    for kind, value in sans:
        if kind in _PREFIX_SANS and isinstance(value, str) and value.startswith(prefixes):
            return None
    present = ", ".join(f"{kind}:{value}" for kind, value in sans)[:200] or "none"
    return (
        f"certificate verify failed: its subject alt names ({present}) are in none of the "
        f"trust domains {', '.join(prefixes)[:200]}"
    )


def _der_element(der: bytes, at: int, end: int) -> tuple[int, int, int]:
    """The DER element at ``at`` (before ``end``): its tag, where its content starts and
    where it ends. ``ValueError`` if it does not fit."""
    if at + 2 > end:
        raise ValueError("truncated")
    tag, size = der[at], der[at + 1]
    start = at + 2
    if size & 0x80:
        count = size & 0x7F
        if not 0 < count <= 4 or start + count > end:
            raise ValueError("bad length")
        size = int.from_bytes(der[start : start + count], "big")
        start += count
    if start + size > end:
        raise ValueError("truncated")
    return tag, start, start + size


def public_key_info(der: bytes) -> bytes:
    """The DER ``SubjectPublicKeyInfo`` of a DER certificate (what ``verifyCertificateSpki``
    hashes): the seventh element of ``tbsCertificate``, or the sixth when ``version`` is
    absent (RFC 5280, 4.1). Linear, and ``ValueError`` on bytes that are not one."""
    tag, start, _ = _der_element(der, 0, len(der))
    if tag != 0x30:
        raise ValueError("not a certificate")
    tag, at, end = _der_element(der, start, len(der))  # tbsCertificate
    if tag != 0x30:
        raise ValueError("not a certificate")
    if at < end and der[at] == 0xA0:  # [0] version
        at = _der_element(der, at, end)[2]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        at = _der_element(der, at, end)[2]
    tag, _, stop = _der_element(der, at, end)
    if tag != 0x30:
        raise ValueError("no public key info")
    return der[at:stop]


class ClientCheck:
    """What a ``MUTUAL`` or ``OPTIONAL_MUTUAL`` listener requires of a client certificate
    beyond its chain (Istio's ``subjectAltNames``, ``verifyCertificateSpki`` and
    ``verifyCertificateHash``, Envoy's validation context): one of the names, if any are
    set, and one of the pins of either kind, if any are set."""

    __slots__ = ("hashes", "names", "prefixes", "spki")

    def __init__(self, tls: ListenerTls) -> None:
        self.names = tls.subject_alt_names
        self.prefixes = tls.subject_alt_name_prefixes
        self.spki = frozenset(tls.verify_certificate_spki)
        self.hashes = frozenset(tls.verify_certificate_hash)

    def refusal(self, ssl_object: Any) -> str | None:
        """Why the client certificate of ``ssl_object`` (its handshake done) is refused;
        ``None``: allowed, or none presented (``OPTIONAL_MUTUAL``: OpenSSL refused a
        ``MUTUAL`` client without one)."""
        der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
        if not der:
            return None
        if self.names:
            why = san_mismatch(ssl_object.getpeercert(), self.names)
            if why is not None:
                return why
        if self.prefixes:
            why = san_prefix_mismatch(ssl_object.getpeercert(), self.prefixes)
            if why is not None:
                return why
        if self.spki or self.hashes:
            if hashlib.sha256(der).hexdigest() in self.hashes:
                return None
            try:
                key = public_key_info(der)
            except ValueError as exc:  # OpenSSL verified it: not expected
                return f"its public key cannot be read ({exc})"
            spki = base64.b64encode(hashlib.sha256(key).digest()).decode()
            if spki not in self.spki:
                return "its digest and its public key's match none of the pinned ones"
        return None


def handshake_reason(exc: BaseException, timed_out: bool = False) -> str:
    """The bounded reason (one of :data:`HANDSHAKE_ERRORS`) of a failed handshake."""
    if timed_out or isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "bad_certificate"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "closed"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _NOT_TLS:
            return "not_tls"
        if reason in _VERSION:
            return "protocol_version"
        if reason == "NO_SHARED_CIPHER":
            return "no_shared_cipher"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_client_certificate"
        if reason == "CERTIFICATE_VERIFY_FAILED":
            return "bad_certificate"
        if reason.startswith(("TLSV1_ALERT", "SSLV3_ALERT", "TLSV13_ALERT")):
            return "peer_rejected"
        if reason == "UNEXPECTED_EOF_WHILE_READING":
            return "closed"
        return "error"
    if isinstance(exc, (ConnectionError, EOFError)):
        return "closed"
    return "error"


def describe(exc: BaseException) -> str:
    """A failed upstream handshake, for the local reply's message."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"TLS handshake failed: {exc}"


class TlsStats:
    """The TLS series of one listener or cluster (``kind`` is the label: ``listener`` or
    ``cluster``); reasons' series are made on first use, and the certificates' expiry is
    shown once the configuration is in force (:func:`show_expiry`)."""

    def __init__(self, stats: Any, kind: str, name: str, expiry: Iterable[tuple[str, float]]):
        self._stats = stats
        self._labels = {kind: name}
        #: The certificate files' ``(path, notAfter)``.
        self.expiry = tuple(expiry)
        self.handshakes: Counter = stats.counter(
            "metaprotocol_tls_handshakes_total", **self._labels
        )
        self._errors: dict[str, Counter] = {}

    def expiry_series(self) -> Iterable[tuple[Labels, int]]:
        """The labels and value of each certificate's expiry series."""
        for path, expires in self.expiry:
            yield (*self._labels.items(), ("certificate", path)), int(expires)

    def error(self, reason: str) -> None:
        """Count a failed handshake."""
        counter = self._errors.get(reason)
        if counter is None:
            counter = self._errors[reason] = self._stats.counter(
                "metaprotocol_tls_handshake_errors_total", **self._labels, reason=reason
            )
        counter.value += 1


def show_expiry(
    stats: Stats,
    owners: Iterable[ListenerRuntime | Cluster],
    identity: IdentityWatch | None = None,
) -> None:
    """``metaprotocol_tls_certificate_expiry_seconds`` of the listeners and clusters in
    force and of the workload identity (``identity="mesh"``), and of nothing else: a
    certificate moved to another path, a listener or cluster made plain, leaves no series
    behind (an alert on it would fire for a file unused); a configuration staged and refused
    shows nothing."""
    values: dict[Labels, int] = {}
    for owner in owners:
        if owner.tls_stats is not None:
            values.update(owner.tls_stats.expiry_series())
    if identity is not None:
        values.update(identity.expiry_series())
    stats.replace_gauges("metaprotocol_tls_certificate_expiry_seconds", values)


# -- downstream ----------------------------------------------------------------------------


def tls_accept(runtime: ListenerRuntime, context: ssl.SSLContext) -> asyncio.BaseProtocol:
    """The protocol of a new client connection of a TLS listener: the loop's TLS layer,
    with a :class:`TlsDownstream` above it that is told of the connection once the
    handshake is done. A connection the engine refuses (``maxConnections``, overload,
    draining) is closed before any handshake, as a plain one is."""
    engine = runtime.engine
    reason = engine.refuse_connection()
    if reason is not None:
        return Refused(runtime.rejected[reason])
    return tls_layer(runtime, context, engine.handshake_timeout)


def tls_layer(
    runtime: ListenerRuntime, context: ssl.SSLContext, timeout: float
) -> asyncio.BaseProtocol:
    """The TLS layer of a connection admitted, over a :class:`TlsDownstream` (one of the
    engine's ``handshaking`` until its handshake ends, within ``timeout`` seconds)."""
    engine = runtime.engine
    loop = engine.loop
    stats = runtime.tls_stats
    assert stats is not None
    downstream = TlsDownstream(runtime, stats)
    waiter = loop.create_future()
    layer = handshake_class(loop)(
        loop,
        downstream,
        context,
        waiter,
        server_side=True,
        ssl_handshake_timeout=timeout,
    )
    downstream.handshake = layer
    layer.watcher = downstream
    engine.handshaking.add(downstream)
    waiter.add_done_callback(downstream.handshake_done)
    return cast(asyncio.BaseProtocol, layer)


class TlsDownstream(Downstream):
    """A client connection of a TLS listener.

    From the accept until its handshake is done it is one of the engine's ``handshaking``
    connections (they count against ``limits.maxConnections``); the TLS layer closes it
    after ``timeouts.handshake`` (asyncio's ``ssl_handshake_timeout``), and a failed
    handshake is counted by reason (:data:`HANDSHAKE_ERRORS`), never logged. Then it is a
    :class:`Downstream` like any other, but for what it counts as unsent (below).
    """

    __slots__ = ("client_check", "close_notified", "handshake", "raw", "raw_paused", "tls_stats")

    def __init__(self, listener: ListenerRuntime, tls_stats: TlsStats) -> None:
        super().__init__(listener)
        #: The listener's client certificate check when the handshake began (``None``: the
        #: chain alone, verified during it).
        self.client_check = listener.tls_check
        #: The TLS layer while the handshake runs (``None`` after).
        self.handshake: Any = None
        #: The TCP transport under the TLS layer (set once the handshake is done).
        self.raw: asyncio.Transport | None = None
        #: That transport paused the TLS layer's writing: it will say when it drained.
        self.raw_paused = False
        #: The listener's TLS series when the handshake began (a reload may make the
        #: listener plain before it ends).
        self.tls_stats = tls_stats
        #: The client sent its close_notify (a half-close: see :meth:`tls_half_close`).
        self.close_notified = False

    def refuses(self, ssl_object: Any) -> str | None:
        """Why the listener's :class:`ClientCheck` refuses the client certificate of
        ``ssl_object``, whose handshake just completed (``None``: admitted). Asked by the
        TLS object (``HalfClosing``), which then fails the handshake: counted
        ``bad_certificate`` by :meth:`handshake_done`."""
        check = self.client_check
        why = None if check is None else check.refusal(ssl_object)
        if why is not None:
            log.debug("TLS: client certificate refused on %s: %s", self.listener.name, why)
        return why

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The handshake is done (the TLS layer calls this before passing any data on). The
        TLS object refused a certificate the listener's :class:`ClientCheck` refuses before
        the handshake completed (:meth:`refuses`); checked again here all the same: one
        refused is reset at once, counted ``bad_certificate``, before any of its bytes is
        read."""
        self.engine.handshaking.discard(self)
        self.raw = self.handshake.raw
        self.handshake = None
        check = self.client_check
        ssl_object = transport.get_extra_info("ssl_object")
        if check is not None and (why := check.refusal(ssl_object)) is not None:
            self.tls_stats.error("bad_certificate")
            log.debug("TLS: client certificate refused on %s: %s", self.listener.name, why)
            self.closed = True
            self.transport = cast(asyncio.Transport, transport)
            self.abort()
            return
        self.tls_stats.handshakes.value += 1
        istio = self.engine.istio
        if istio is not None and istio.inbound:
            listener = self.listener
            identity = self.engine.identity
            local = listener.local_uris
            if listener.mesh_tls is not None and identity is not None:
                local = identity.material.uris
            self.istio = istio.identities(uris_of(transport.get_extra_info("peercert")), local)
        super().connection_made(transport)
        if isinstance(ssl_object, HalfClosing) and not self.closed:
            ssl_object.peer = self
            if ssl_object.selected_alpn_protocol() == PEER_EXCHANGE:
                # Istio's metadata exchange: its header is read before the codec's bytes.
                PeerExchange(self, transport, self.engine.peer_header).start()
        raw = self.raw
        if raw is not None and not self.closed:
            # The TCP transport pauses and resumes at the connection's own marks: while it is
            # not paused it holds at most connectionBufferBytes (the TLS layer holds nothing
            # then), so the connection may resume without waiting for a word that never comes.
            high = self.engine.connection_buffer
            raw.set_write_buffer_limits(high=high, low=high // 4)

    # The TLS layer counts what it has not encrypted or not handed on, and pauses the
    # engine's writing on that alone; but it hands everything it encrypted to the TCP
    # transport under it at once, however much (it stops only once that transport says it is
    # full). A large reply to a client that reads nothing sits there: the connection's unsent
    # bytes are both, and its writing is paused on both, so that the buffer budget,
    # ``connectionBufferMaxBytes`` and ``timeouts.write`` see it as on a plain connection.
    # Judged when either layer pauses or resumes (the TLS layer tells of the TCP transport's
    # flow control by ``raw_flow``), and at each sweep. Once the transport is not paused
    # (and, at its marks, holds at most ``connectionBufferBytes``) the connection resumes:
    # the transport will not report draining from between its water marks.

    def _account_unsent(self) -> None:
        transport, raw = self.transport, self.raw
        unsent = 0
        if transport is not None:
            unsent = transport.get_write_buffer_size()
            if raw is not None:
                unsent += raw.get_write_buffer_size()
        if unsent != self.unsent:
            self.engine.buffered += unsent - self.unsent
            self.unsent = unsent
        high = self.engine.connection_buffer
        if not self.write_paused and unsent > high and transport is not None:
            super().pause_writing()
        elif self.write_paused and (
            unsent <= high // 4 or (not self.raw_paused and unsent <= high)
        ):
            super().resume_writing()

    def pause_writing(self) -> None:
        """The TLS layer is full: judged again on the whole (see above)."""
        self._account_unsent()

    def resume_writing(self) -> None:
        """The TLS layer drained: judged again on the whole (see above)."""
        self._account_unsent()

    def raw_flow(self, resumed: bool) -> None:
        """The TCP transport under the TLS layer paused or resumed it: judged again."""
        self.raw_paused = not resumed
        self._account_unsent()

    def sweep(self, now: float) -> int:
        """As a plain connection's, on an up-to-date count (the TCP transport's draining is
        not reported to this connection)."""
        self._account_unsent()
        return super().sweep(now)

    def handshake_done(self, waiter: asyncio.Future[Any]) -> None:
        """The TLS layer's verdict: count a failure by reason (a success is counted by
        :meth:`connection_made`). A handshake the engine aborted (:meth:`abort`: a stop, a
        reload) ends without an exception, and is no client's failure: not counted."""
        exc = None if waiter.cancelled() else waiter.exception()  # retrieved: never logged
        if exc is None and not self.closed:
            return  # done: connection_made ran
        self.engine.handshaking.discard(self)
        self.handshake = None
        if exc is not None and not self.closed and not self.engine.draining:
            self.tls_stats.error(handshake_reason(exc))

    def abort(self) -> None:
        """Reset the connection now (also while it shakes hands)."""
        layer = self.handshake
        if layer is not None and layer.raw is not None:
            layer.raw.abort()
        super().abort()

    def eof_received(self) -> None:
        """As a plain connection's (the TLS layer calls it only for a close_notify that
        came while the connection was closing; returning ``True`` would only log a warning
        there)."""
        super().eof_received()

    def tls_half_close(self) -> bool:
        """The client's close_notify, seen by the TLS layer as it reads (``HalfClosing``):
        the TLS form of a half-close, answered as a plain one is (:meth:`eof_received`:
        what is in flight is answered, then the connection closes, with the engine's own
        close_notify), once the layer passed on what it read before it. ``False``: the
        connection is closing already, the layer ends it its own way."""
        if self.closed or self.transport is None:
            return False
        self.close_notified = True
        self.engine.loop.call_soon(self._half_closed)
        return True

    def _half_closed(self) -> None:
        if not self.closed and self.transport is not None:
            self.eof_received()

    def keeps_raw_open(self) -> bool:
        """Whether the end of the TCP stream under the TLS layer leaves it open: after the
        client's close_notify, until the layer closes it once the replies are sent."""
        return self.close_notified and self.transport is not None


def attach_listener(
    runtime: ListenerRuntime, tls: ListenerTls | None, identity: IdentityWatch | None = None
) -> None:
    """Give a listener's runtime its TLS context and series (``None``: plain TCP); an
    ``ISTIO_MUTUAL`` one the current context of the workload ``identity``."""
    if tls is None:
        return
    runtime.tls = tls.context
    if tls.mode == "ISTIO_MUTUAL" and identity is not None:
        from .identity import server_key

        runtime.mesh_tls = tls
        runtime.tls = identity.material.server(server_key(tls))
    runtime.tls_stats = TlsStats(runtime.engine.stats, "listener", runtime.name, tls.expiry)
    if runtime.engine.istio is not None and runtime.mesh_tls is None:
        runtime.local_uris = certificate_uris(tls.server_certificate)
    if (
        tls.subject_alt_names
        or tls.subject_alt_name_prefixes
        or tls.verify_certificate_spki
        or tls.verify_certificate_hash
    ):
        runtime.tls_check = ClientCheck(tls)


# -- upstream ------------------------------------------------------------------------------


class TlsUpstreamConnection(UpstreamConnection):
    """A connection to an upstream host of a cluster with TLS (``trafficPolicy.tls``).

    Its TLS layer is the loop's own, made here (not by ``create_connection``) so that the
    TCP transport under it is known: the layer hands all it encrypts to that transport at
    once, and a large request to an upstream that reads nothing sits there, out of the
    layer's count. The connection's unsent bytes are both, and its writing (what makes the
    clients sending to it wait) is paused on both, against that transport's own water
    marks, as a plain connection's is: the buffer budget and ``timeouts.upstreamWrite`` see
    such a request as on a plain connection."""

    __slots__ = ("raw", "raw_paused", "refused")

    def __init__(self, cluster: Cluster, host: UpstreamHost, owner: Downstream | None) -> None:
        super().__init__(cluster, host, owner)
        #: Why the server's certificate was refused after the handshake (its names).
        self.refused: str | None = None
        #: The TCP transport under the TLS layer (once connected).
        self.raw: asyncio.Transport | None = None
        #: That transport paused the TLS layer's writing: it will say when it drained.
        self.raw_paused = False

    async def _connect(self) -> None:
        cluster = self.cluster
        tls = cluster.tls
        assert tls is not None and cluster.tls_stats is not None
        host = self.host
        server_name = tls.sni or cluster.service
        why = server_name_error(server_name)  # a service host may be no server name
        if why is not None:  # no handshake begun: a connect failure, not a handshake's
            self._connect_failed(f"TLS: {why}")
            self.task = None
            return
        context = tls.context
        if tls.mode == "ISTIO_MUTUAL":  # the workload identity's context of the moment
            identity = self.engine.identity
            if identity is None:  # a cluster draining after a reload removed the identity
                self._connect_failed("TLS: no spec.meshIdentity is configured (ISTIO_MUTUAL)")
                self.task = None
                return
            material = identity.material
            context = material.client if tls.peer_exchange else material.client_without_exchange
        loop = self.engine.loop
        waiter = loop.create_future()
        layer = handshake_class(loop)(
            loop,
            self,
            context,
            waiter,
            server_side=False,
            server_hostname=server_name,
            ssl_handshake_timeout=cluster.connect_timeout,
        )
        layer.watcher = self
        if cluster.proxy_protocol is not None:  # before the ClientHello (see Handshake)
            layer.preface = self.proxy_header()
        try:
            async with asyncio.timeout(cluster.connect_timeout):
                if cluster.tunnel is None:
                    self.raw, _ = await loop.create_connection(
                        lambda: layer, host.address, host.port
                    )
                else:  # the handshake runs inside the tunnel, with its target (tunnel.py)
                    raw, rest = await open_tunnel(loop, host.address, host.port, cluster.tunnel)
                    self.raw = raw
                    hand_over(raw, layer, rest)
                await waiter  # the handshake (connection_made ran if it succeeded)
        except TunnelRefused as exc:
            if not self.connecting:
                return
            self.raw = None
            self._connect_failed(connect_error(exc))
        except (OSError, TimeoutError) as exc:
            if not self.connecting:
                # The handshake was done just as the timeout fired (the timer ran first, or
                # the task had not resumed): connected, and the connection is kept.
                return
            if layer.raw is not None:
                layer.raw.abort()
            self.raw = None
            if isinstance(exc, ssl.SSLError):
                cluster.tls_stats.error(handshake_reason(exc))
                self._connect_failed(describe(exc))
            elif isinstance(exc, TimeoutError):
                self._connect_failed("timed out")
            elif isinstance(exc, ConnectionResetError) and not exc.args:
                # The TLS layer's word for a server that closed mid-handshake (a plain-text
                # server that does not understand the ClientHello, say).
                cluster.tls_stats.error("closed")
                self._connect_failed("TLS handshake failed: the server closed the connection")
            else:
                self._connect_failed(exc.strerror or str(exc) or type(exc).__name__)
        except BaseException:  # cancelled (the engine stops): nothing left open
            if layer.raw is not None:
                layer.raw.abort()
            raise
        else:
            if self.refused is not None:
                cluster.tls_stats.error("bad_certificate")
                self._connect_failed(f"TLS handshake failed: {self.refused}")
        finally:
            self.task = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = self.cluster.tls
        assert tls is not None and self.cluster.tls_stats is not None
        if tls.subject_alt_names and not tls.insecure_skip_verify:
            why = san_mismatch(transport.get_extra_info("peercert"), tls.subject_alt_names)
            if why is not None:
                self.refused = why
                cast(asyncio.Transport, transport).abort()
                return  # _connect answers the requests waiting
        self.cluster.tls_stats.handshakes.value += 1
        exchange = None
        if tls.mode == "ISTIO_MUTUAL":
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == PEER_EXCHANGE:
                # Istio's metadata exchange: the engine's header before its first request,
                # the server's read before the codec's bytes (peer_exchange.py).
                exchange = UpstreamExchange(self, transport)
                cast(asyncio.Transport, transport).write(self.engine.peer_header)
        istio = self.engine.istio
        if istio is not None:
            self._identify(istio, transport.get_extra_info("peercert"), exchange)
        super().connection_made(transport)
        if exchange is not None:
            if self.closed:  # closed while connecting: its series are the workload-less ones
                exchange.hand_back()
            else:
                exchange.start()

    def _identify(
        self, istio: IstioTelemetry, peercert: Any, exchange: UpstreamExchange | None
    ) -> None:
        """The connection's identities in Istio's series, and at the client side its TCP
        series (which count the requests sent while it connected; while its metadata
        ``exchange`` runs, in the exchange's tally, until the server said its workload)."""
        tls = self.cluster.tls
        identity = self.engine.identity
        local = self.cluster.local_uris
        if tls is not None and tls.mode == "ISTIO_MUTUAL" and identity is not None:
            local = identity.material.uris
        self.istio = self.host.istio = ids = istio.identities(uris_of(peercert), local)
        if not istio.inbound:
            cluster = self.cluster
            if exchange is not None:
                tcp = self.tcp = exchange.tally = TcpSeries.unlisted()
            else:
                tcp = self.tcp = istio.tcp(
                    cluster.service, cluster.namespace, self.host.labels, ids
                )
            tcp.sent.value += sum(len(b) for b in self.queued)

    def _preface(self, transport: asyncio.Transport) -> None:
        """The PROXY protocol header went on the TCP connection, before the handshake
        (``_connect``): nothing to write on the TLS one."""

    def keeps_raw_open(self) -> bool:
        """The TLS layer's own handling of the end of the TCP stream under it."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        # A TLS 1.3 server that refuses this client's certificate does so after the client's
        # side of the handshake ended: the connection is made, then lost (the TLS layer
        # reports no alert), and the requests sent on it get UpstreamReset, as in Envoy.
        self.raw = None
        if self.refused is None:  # else it was never made: _connect answered
            super().connection_lost(exc)

    # -- what is unsent: both layers (see the class) ---------------------------------------

    def account_unsent(self) -> int:
        """Recount the bytes waiting for the upstream: queued, in the TLS layer, and in the
        TCP transport under it."""
        unsent = super().account_unsent()
        raw = self.raw
        if raw is not None and self.transport is not None:
            extra = raw.get_write_buffer_size()
            self.unsent += extra
            self.engine.buffered += extra
            unsent += extra
        return unsent

    def _flush(self) -> None:
        super()._flush()
        self._judge()

    def _judge(self) -> None:
        """Pause or resume the connection's writing on what both layers hold.

        Paused, it resumes under the transport's low-water mark, or as soon as the transport
        is not paused: then the TLS layer holds nothing (it hands all on at once), and the
        transport, between its water marks, will not say when it drains (it would stay
        paused for good, and its clients unread)."""
        unsent = self.account_unsent()
        raw = self.raw
        if raw is None:
            return
        low, high = raw.get_write_buffer_limits()
        if not self.write_paused and unsent > high:
            super().pause_writing()
        elif self.write_paused and (unsent <= low or not self.raw_paused):
            super().resume_writing()

    def pause_writing(self) -> None:
        """The TLS layer is full: judged on both layers."""
        self._judge()

    def resume_writing(self) -> None:
        """The TLS layer drained: judged on both layers."""
        self.drained = True  # progress, for the write watch
        self._judge()

    def raw_flow(self, resumed: bool) -> None:
        """The TCP transport under the TLS layer paused or resumed it: judged again."""
        self.raw_paused = not resumed
        if resumed:
            self.drained = True  # the upstream took bytes: progress, for the write watch
        self._judge()


def attach_cluster(
    cluster: Cluster, tls: UpstreamTls | None, mutual: Sequence[bool] | None = None
) -> None:
    """Make a cluster's connections TLS (``None`` or ``DISABLE``: plain TCP); with
    ``mutual`` (automatic mutual TLS), only those to the hosts it says, in order: each host
    keeps its connection class, so that nothing is decided per request."""
    if tls is None or not tls.enabled:
        return
    cluster.tls = tls
    if mutual is not None and not any(mutual):
        return  # shown in /config_dump; no connection of it is TLS
    cluster.tls_stats = TlsStats(cluster.engine.stats, "cluster", cluster.name, tls.expiry)
    if cluster.engine.istio is not None and tls.mode == "MUTUAL":
        cluster.local_uris = certificate_uris(tls.client_certificate)
    for i, host in enumerate(cluster.hosts):
        if mutual is None or mutual[i]:
            host.connection_class = TlsUpstreamConnection


def dump_upstream(tls: UpstreamTls | None, cluster: Cluster | None = None) -> dict[str, Any] | None:
    """A cluster's TLS settings for ``/config_dump``: paths, never what the files hold; with
    automatic mutual TLS, the endpoints that get it; with ``ISTIO_MUTUAL``, whether Istio's
    metadata exchange is offered."""
    if tls is None:
        return None
    auto: dict[str, Any] = {}
    if tls.mode == "ISTIO_MUTUAL":
        auto["peerExchange"] = tls.peer_exchange
    if tls.auto and cluster is not None:
        settings = cluster.engine.config.proxy.mesh_identity
        auto["autoMtls"] = {
            "endpoints": [
                h.key for h in cluster.hosts if h.connection_class is not UpstreamConnection
            ],
            # Why every endpoint is plain TCP (the control plane's automatic mutual TLS).
            "off": "no spec.meshIdentity is configured"
            if settings is None
            else None
            if settings.auto_mtls
            else "spec.meshIdentity.autoMtls is false",
        }
    return {
        "mode": tls.mode,
        "caCertificates": tls.ca_certificates,
        "clientCertificate": tls.client_certificate,
        "privateKey": tls.private_key,
        "sni": tls.sni,
        "subjectAltNames": list(tls.subject_alt_names),
        "insecureSkipVerify": tls.insecure_skip_verify,
        "caCrl": tls.ca_crl,
        "filesDigest": tls.digest[:12] or None,
        "certificateExpiry": {path: expires for path, expires in tls.expiry},
        **auto,
    }


def dump_listener(tls: ListenerTls | None) -> dict[str, Any] | None:
    """A listener's TLS settings for ``/config_dump``: paths, never what the files hold."""
    if tls is None:
        return None
    return {
        "mode": tls.mode,
        "serverCertificate": tls.server_certificate,
        "privateKey": tls.private_key,
        "caCertificates": tls.ca_certificates,
        "minProtocolVersion": tls.min_protocol_version,
        "maxProtocolVersion": tls.max_protocol_version,
        "cipherSuites": list(tls.cipher_suites),
        "subjectAltNames": list(tls.subject_alt_names),
        "subjectAltNamePrefixes": list(tls.subject_alt_name_prefixes),
        "verifyCertificateSpki": list(tls.verify_certificate_spki),
        "verifyCertificateHash": list(tls.verify_certificate_hash),
        "caCrl": tls.ca_crl,
        "filesDigest": tls.digest[:12],
        "certificateExpiry": {path: expires for path, expires in tls.expiry},
    }
