"""TLS for the proxy benchmark's own processes (``bench_proxy.py --tls``).

``bench_proxy.py --tls`` writes a test CA and one server certificate (for ``127.0.0.1`` and
:data:`SERVER_NAME`) with ``trustme`` into a directory and names it in :data:`ENV`; the canned
upstream, the load generator and the uvloop floor read it from there, so that every hop of
every target is TLS: load generator -> proxy -> upstream.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

#: The environment variable naming the directory of ``ca.pem``, ``cert.pem``, ``key.pem``.
ENV = "BENCH_TLS_DIR"
#: The name the certificate is for, and the clients ask for (SNI).
SERVER_NAME = "bench.test"


def directory() -> Path | None:
    """The certificates' directory when the benchmark runs over TLS, else ``None``."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


def write_certificates(where: Path) -> Path:
    """A fresh CA and a server certificate (key included) in ``where``; returns ``where``."""
    import trustme

    where.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    leaf = ca.issue_cert(SERVER_NAME, "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(where / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(where / "cert.pem"))
    return where


def server_context() -> ssl.SSLContext | None:
    """The servers' context (``None`` without TLS)."""
    root = directory()
    if root is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(root / "cert.pem", root / "key.pem")
    return context


def client_context() -> ssl.SSLContext | None:
    """The clients' context, trusting the test CA (``None`` without TLS)."""
    root = directory()
    if root is None:
        return None
    return ssl.create_default_context(cafile=str(root / "ca.pem"))
