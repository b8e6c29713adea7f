"""A mesh CA as istiod's (a self-signed root) issuing SPIFFE workload certificates, and the
files istio-agent writes for a workload (``OUTPUT_CERTS``): shared by the tests of Istio
mutual TLS (tests/proxy with Python peers, tests/xds with Envoy)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "cluster.local"
ALPN_SIDECAR = ["istio-peer-exchange", "istio"]  # what an Istio sidecar offers and accepts


def spiffe(sa: str, ns: str = "default", trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class MeshCa:
    """A mesh root (as istiod's self-signed CA) issuing SPIFFE workload certificates."""

    def __init__(self, name: str = "mesh-root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def workload(
        self,
        sa: str,
        hours: float = 24,
        ns: str = "default",
        uris: tuple[str, ...] = (),
        trust_domain: str = TRUST_DOMAIN,
    ) -> tuple[bytes, bytes, int]:
        """A workload certificate for ``spiffe(sa, ns, trust_domain)`` (no subject, the URI
        SAN only, as istiod issues them; ``uris``: other URI SANs after it): its PEM, its
        key's PEM and its serial number."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=hours))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(u)
                        for u in (spiffe(sa, ns, trust_domain), *uris)
                    ]
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem(key), serial

    def write(self, directory: Path, sa: str, hours: float = 24, ns: str = "default") -> int:
        """What istio-agent writes (``OUTPUT_CERTS``) for ``sa``; the certificate's serial."""
        directory.mkdir(parents=True, exist_ok=True)
        chain, key, serial = self.workload(sa, hours, ns)
        (directory / "cert-chain.pem").write_bytes(chain)
        (directory / "key.pem").write_bytes(key)
        (directory / "root-cert.pem").write_bytes(self.pem)
        return serial

    def files(
        self,
        directory: Path,
        sa: str,
        ns: str = "default",
        uris: tuple[str, ...] = (),
        trust_domain: str = TRUST_DOMAIN,
    ) -> tuple[str, str]:
        """A workload certificate and key as two files (for a peer), their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        chain, key, _ = self.workload(sa, ns=ns, uris=uris, trust_domain=trust_domain)
        (directory / f"{sa}.pem").write_bytes(chain)
        (directory / f"{sa}.key").write_bytes(key)
        return str(directory / f"{sa}.pem"), str(directory / f"{sa}.key")

    def server_context(self, tmp: Path, sa: str, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A sidecar-like server: the ``sa`` workload certificate, client certificates
        required and chained to this root."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.files(tmp, sa))
        ctx.load_verify_locations(cadata=self.pem.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def client_context(
        self, tmp: Path, sa: str | None, alpn: list[str] | None = ALPN_SIDECAR
    ) -> ssl.SSLContext:
        """A sidecar-like client (``sa`` None: no certificate)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=self.pem.decode())
        if sa is not None:
            ctx.load_cert_chain(*self.files(tmp, sa))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


# -- Istio's TCP metadata exchange, as a sidecar speaks it (ALPN istio-peer-exchange) ----------
#
# Built and read with the protobuf library's own Any and Struct (not the engine's code): the
# format of Istio's metadata_exchange filter (Envoy's contrib/istio/filters/network/
# metadata_exchange: a magic number and a length, big-endian, then an Any of a Struct).

EXCHANGE_MAGIC = 0x3D230467


def exchange_header(metadata: dict[str, Any], node_id: str = "") -> bytes:
    """A sidecar's exchange header: ``metadata`` (``NAME``, ``NAMESPACE``, ``WORKLOAD_NAME``,
    ``CLUSTER_ID``, ``LABELS``...) under ``x-envoy-peer-metadata``."""
    from google.protobuf import any_pb2, struct_pb2

    data = struct_pb2.Struct()
    data.fields["x-envoy-peer-metadata"].struct_value.update(metadata)
    if node_id:
        data.fields["x-envoy-peer-metadata-id"].string_value = node_id
    packed = any_pb2.Any(
        type_url="type.googleapis.com/google.protobuf.Struct",
        value=data.SerializeToString(deterministic=True),
    )
    body = packed.SerializeToString()
    return EXCHANGE_MAGIC.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


def read_exchange(buffer: bytearray) -> dict[str, Any] | None:
    """Take a whole exchange header off ``buffer``: the peer's Struct as a dict (``None``:
    not all of it is there yet; raises ``ValueError`` for bytes that are not one)."""
    from google.protobuf import any_pb2, json_format, struct_pb2

    if len(buffer) < 8:
        return None
    if int.from_bytes(buffer[:4], "big") != EXCHANGE_MAGIC:
        raise ValueError(f"no exchange header: {bytes(buffer[:8])!r}")
    size = int.from_bytes(buffer[4:8], "big")
    if len(buffer) < 8 + size:
        return None
    packed = any_pb2.Any.FromString(bytes(buffer[8 : 8 + size]))
    del buffer[: 8 + size]
    data = struct_pb2.Struct.FromString(packed.value)
    assert packed.type_url == "type.googleapis.com/google.protobuf.Struct"
    return dict(json_format.MessageToDict(data))


#: A sidecar client's workload, as its exchange says it.
SIDECAR_METADATA: dict[str, Any] = {
    "NAME": "frontend-7d9c-x2k4p",
    "NAMESPACE": "web",
    "WORKLOAD_NAME": "frontend",
    "CLUSTER_ID": "Kubernetes",
    "LABELS": {
        "app": "frontend",
        "version": "v3",
        "service.istio.io/canonical-name": "frontend",
        "service.istio.io/canonical-revision": "v3",
    },
    "OWNER": "kubernetes://apis/apps/v1/namespaces/web/deployments/frontend",
}
