"""The workload identity from a Secret Discovery Service server (``spec.meshIdentity.sds``).

istio-agent serves a workload's identity over SDS on a Unix socket
(``/var/run/secrets/workload-spiffe-uds/socket``), as Envoy reads it: the secret ``default``
(the workload certificate and its key) and ``ROOTCA`` (the mesh root), each pushed again when
it rotates; SPIRE's agent serves the same names when set up for Istio. This module is the
engine's client of it:

* :func:`store_for` fetches both secrets, synchronously, when the configuration is loaded
  (at start, or at a reload naming a server no stream of the engine follows), waiting up to
  ``initialFetchTimeout`` for the server to come up; the loader then builds the identity as
  from istio-agent's files. The secrets are written to a private directory (``0700``, under
  ``/dev/shm`` when it exists, so a key stays in memory; removed at exit): Python's ``ssl``
  loads a certificate and its key from files only.
* :class:`SdsWatch` holds the stream open while the engine serves: each secret pushed is
  checked with the other in force (certificate and key matching, chaining to the root, not
  expired: what a peer would check) in a staging copy, where the new identity's contexts are
  built, then written in place and those contexts swapped in on the loop at once; one that
  cannot be used is NACKed with why, and the identity in force kept. A broken stream is
  reopened with a capped, jittered backoff.

Every byte from the server is bounded: messages of at most :data:`MAX_MESSAGE_BYTES`, secrets
of at most :data:`~.tls.MAX_PEM_BYTES` each, and after each update the next waits as long as
that one took (at least :data:`MIN_UPDATE_PAUSE`, and :data:`MIN_ROTATION_GAP` after one that
rotated the identity or was refused), so a server pushing without pause gets at most half of
the SDS thread's time, and at most one rotation or one logged refusal a second.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import queue
import random
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from .config.models import MeshIdentity, SdsSource
from .control_stream import backoff_delay, keepalive_options
from .identity import (
    DEFAULT_SERVER,
    FIELDS,
    IdentityChanging,
    IdentityMaterial,
    ServerKey,
    load_identity,
)
from .tls import MAX_PEM_BYTES, TlsSettingError

log = logging.getLogger("metaprotocol.proxy")

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
#: Largest response accepted: two secrets of at most ``MAX_PEM_BYTES`` each, and their wrapping.
MAX_MESSAGE_BYTES = 4 * MAX_PEM_BYTES
#: ``google.rpc.Code.INVALID_ARGUMENT``: the code of a NACK's ``error_detail``.
INVALID_ARGUMENT = 3
#: Longest ``error_detail`` sent and kept for ``/config_dump``.
MAX_ERROR_DETAIL = 4096
#: Longest ``version_info`` and ``nonce`` taken (istio-agent's are about 40 characters).
MAX_VERSION_LENGTH = 1024
#: The shortest wait between two updates (see the module's docstring).
MIN_UPDATE_PAUSE = 0.01
#: The shortest wait after a response that rotated the identity, or was refused, before the
#: next is taken: rotating in costs the event loop the files written in place (the new
#: contexts are built in the thread), a refusal a warning in the log, and a server pushing
#: without pause must not make the engine do either all the time (istio-agent rotates every
#: 12 hours by default).
MIN_ROTATION_GAP = 1.0
#: Longest :meth:`SdsWatch.stop` waits for gRPC to finish with the call it cancelled.
STOP_WAIT = 1.0
#: Reconnect backoff: the first wait and the cap (doubling, times a random 50-100 %).
BACKOFF_INITIAL, BACKOFF_MAX = 0.5, 30.0
#: A stream that answered and lasted this long was healthy: the backoff starts again after
#: it, however it ended (a server that ends each stream once it answered gets the backoff).
STABLE_STREAM = 1.0
#: The identity's files, by field, as the private directory names them (istio-agent's names).
FILE_NAMES = {
    "certificateChain": "cert-chain.pem",
    "privateKey": "key.pem",
    "rootCertificates": "root-cert.pem",
}
#: Where a private directory is made when it exists (memory, not disk); else the system's.
SHARED_MEMORY = "/dev/shm"
#: The start of a private directory's name.
DIRECTORY_PREFIX = "metaprotocol-identity-"


class SecretRefused(Exception):
    """A response, or a secret in it, that the engine cannot use (the reason is the NACK's)."""


def channel_options(source: SdsSource) -> list[tuple[str, int]]:
    """gRPC channel arguments: bounded messages, reconnects soon after the server comes up
    (gRPC's own backoff reaches two minutes, longer than a start waits), and HTTP/2
    keepalive, so that a server gone without closing the connection (a ``host:port`` one on
    a node that vanished) is noticed and the stream reopened, not believed connected while
    every rotation is missed until the certificate expires."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        *keepalive_options(source.keepalive_time, source.keepalive_timeout),
    ]


def _request(
    source: SdsSource, version: str = "", nonce: str = "", error: str | None = None
) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        version_info=version,
        resource_names=[source.certificate, source.root],
        type_url=SECRET_TYPE,
        response_nonce=nonce,
        node=base_pb2.Node(id=source.node_id, user_agent_name="metaprotocol-sdk"),
    )
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT, message=error))
    return req


def _only(message: Message, allowed: set[str], path: str) -> None:
    """:class:`SecretRefused` naming the first field of ``message`` set outside ``allowed``:
    each changes what a peer is shown or trusts, and the engine honours none of them."""
    for descriptor, _ in message.ListFields():
        if descriptor.name not in allowed:
            raise SecretRefused(f"{path}.{descriptor.name}: not supported by this engine")


def _data(source: Message, path: str) -> bytes:
    """The bytes of a ``DataSource`` given inline (what istio-agent and SPIRE send)."""
    which = source.WhichOneof("specifier")
    if which == "inline_bytes":
        data = bytes(source.inline_bytes)
    elif which == "inline_string":
        data = source.inline_string.encode("utf-8", "surrogateescape")
    elif which is None:
        raise SecretRefused(f"{path}: empty")
    else:
        raise SecretRefused(f"{path}.{which}: only inline_bytes and inline_string are read")
    if len(data) > MAX_PEM_BYTES:
        raise SecretRefused(f"{path}: {len(data)} bytes, above {MAX_PEM_BYTES}")
    return data


#: What each secret holds: its ``Secret`` field, what that is, and the identity's files (by
#: field of :data:`FILE_NAMES`) from the fields in it, as istio-agent and SPIRE send them.
_SHAPES = {
    "certificate": (
        "tls_certificate",
        "the workload certificate",
        {"certificateChain": "certificate_chain", "privateKey": "private_key"},
    ),
    "root": ("validation_context", "the mesh root", {"rootCertificates": "trusted_ca"}),
}


def read_secrets(response: discovery_pb2.DiscoveryResponse, source: SdsSource) -> dict[str, bytes]:
    """The identity's files (by field of :data:`FILE_NAMES`) that ``response`` carries.

    Secrets of other names are skipped (a server may send more than was asked for). Raises
    :class:`SecretRefused` for anything the engine cannot take as it is, and for one of its
    secrets twice (which one the server means is not the engine's to guess).
    """
    if response.type_url != SECRET_TYPE:
        raise SecretRefused(f"type_url {response.type_url[:100]!r}: expected {SECRET_TYPE}")
    for name, value in (("version_info", response.version_info), ("nonce", response.nonce)):
        if len(value) > MAX_VERSION_LENGTH:  # echoed in every ACK, shown in /config_dump
            raise SecretRefused(f"{name} of {len(value)} characters, above {MAX_VERSION_LENGTH}")
    out: dict[str, bytes] = {}
    seen: set[str] = set()
    for index, packed in enumerate(response.resources):
        path = f"resources[{index}]"
        if packed.type_url != SECRET_TYPE:
            raise SecretRefused(f"{path}: type {packed.type_url[:100]!r}, expected {SECRET_TYPE}")
        secret = secret_pb2.Secret()
        try:
            secret.ParseFromString(packed.value)
        except DecodeError as exc:
            raise SecretRefused(f"{path}: not a Secret ({exc})") from None
        name = secret.name
        role = {source.certificate: "certificate", source.root: "root"}.get(name)
        if role is None:
            continue
        path = f"Secret {name!r}"
        if name in seen:
            raise SecretRefused(f"{path}: twice in one response")
        seen.add(name)
        kind, what, files = _SHAPES[role]
        _only(secret, {"name", kind}, path)
        if not secret.HasField(kind):
            raise SecretRefused(f"{path}: no {kind} ({what})")
        body = getattr(secret, kind)
        _only(body, set(files.values()), f"{path}.{kind}")
        for key, attr in files.items():
            out[key] = _data(getattr(body, attr), f"{path}.{kind}.{attr}")
    return out


def _secret_name(source: SdsSource, key: str) -> str:
    return source.root if key == "rootCertificates" else source.certificate


def _write(path: str, data: bytes) -> None:
    """``data`` into ``path``, readable by the owner only, replacing it whole (a rename)."""
    temporary = f"{path}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


@dataclass
class SecretStore:
    """The identity's secrets as last accepted, and the private directory holding them."""

    source: SdsSource
    directory: str
    #: The accepted PEM bytes, by field of :data:`FILE_NAMES`.
    pems: dict[str, bytes] = field(default_factory=dict)
    #: The version of the last response accepted (``""``: none yet).
    version: str = ""
    #: The engines' streams keeping it current (:class:`SdsWatch`; under ``_stores_lock``):
    #: none, and what it holds may be hours old, so a load fetches the secrets again.
    followers: int = 0
    #: Removed (:meth:`close`): nothing is written any more, whoever asks.
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def path(self, key: str, directory: str | None = None) -> str:
        """Where the file of field ``key`` is (in ``directory``, else the store's)."""
        return os.path.join(directory or self.directory, FILE_NAMES[key])

    def identity(self, base: MeshIdentity, directory: str | None = None) -> MeshIdentity:
        """``base`` with the store's files as its paths."""
        return dataclasses.replace(
            base,
            certificate_chain=self.path("certificateChain", directory),
            private_key=self.path("privateKey", directory),
            root_certificates=self.path("rootCertificates", directory),
            sds=self.source,
        )

    def check(
        self, pems: dict[str, bytes], servers: Iterable[ServerKey] = (DEFAULT_SERVER,)
    ) -> IdentityMaterial:
        """The identity ``pems`` make (its client context, and a server one per key of
        ``servers``), built from a staging copy (the files in force are untouched);
        :class:`SecretRefused` unless each is present, the key the certificate's, the
        certificate chaining to the root and not expired."""
        missing = [_secret_name(self.source, k) for k in FIELDS if k not in pems]
        if missing:
            raise SecretRefused(f"no secret {' or '.join(map(repr, sorted(set(missing))))} yet")
        with self._lock:  # the loader (a thread) and the watch (the loop) may both check
            if self.closed:
                raise SecretRefused("not written: the engine is exiting")
            staging = os.path.join(self.directory, "staging")
            try:
                self._private()
                os.makedirs(staging, mode=0o700, exist_ok=True)
                for key in FIELDS:
                    _write(self.path(key, staging), pems[key])
            except OSError as exc:  # the directory replaced by a file, its filesystem full
                shutil.rmtree(staging, ignore_errors=True)
                raise SecretRefused(
                    f"the secrets could not be written to {self.directory}: {exc}"
                ) from None
            try:
                return load_identity(self.identity(MeshIdentity(), staging), servers)
            except TlsSettingError as exc:
                name = _secret_name(self.source, exc.key)
                text = str(exc).replace(staging + os.sep, "")
                raise SecretRefused(f"Secret {name!r}: {text}") from None
            except (IdentityChanging, OSError) as exc:  # not expected: the copy is ours
                raise SecretRefused(f"the secrets could not be tried: {exc}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def commit(self, pems: dict[str, bytes], version: str) -> bool:
        """Write ``pems`` in place (checked before); whether any file changed. All three are
        written if one is new or missing (the directory removed meanwhile)."""
        with self._lock:
            if self.closed:
                return False
            changed = any(
                self.pems.get(key) != pems[key] or not os.path.exists(self.path(key))
                for key in FIELDS
            )
            if changed:
                self._private()
                for key in FIELDS:
                    _write(self.path(key), pems[key])
            self.pems, self.version = dict(pems), version
        return changed

    def holds(self, pems: dict[str, bytes]) -> bool:
        """Whether the files in place are ``pems`` (not if the store is closed)."""
        with self._lock:
            return not self.closed and self.pems == pems

    def _private(self) -> None:
        """The directory, made again (``0700``) if it was removed (a cleaner of ``/tmp``);
        ``OSError`` if what is there is not ours alone (a link, another user's: someone
        took the name meanwhile)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        info = os.lstat(self.directory)
        if (
            not stat.S_ISDIR(info.st_mode)
            or info.st_uid != os.geteuid()
            or stat.S_IMODE(info.st_mode) & 0o077
        ):
            raise OSError(errno.EPERM, "not a private directory of this user", self.directory)

    def close(self) -> None:
        """Remove the private directory (the key with it), once a check or a write under
        way is done; nothing is written after (at exit, the stream's thread may still be
        handling a secret)."""
        with self._lock:
            self.closed = True
            shutil.rmtree(self.directory, ignore_errors=True)
            fd = _owned.pop(self.directory, None)
            if fd is not None:
                os.close(fd)


#: The stores of this process, by source: one directory per server and names. A load reads
#: what one holds while an engine's :class:`SdsWatch` keeps it current (a reload of the same
#: settings), and fetches both secrets again into it otherwise.
_stores: dict[SdsSource, SecretStore] = {}
_stores_lock = threading.Lock()


#: The lock file in each private directory: held (``flock``) by the process owning it for
#: its whole life, and let go by the kernel however it ends.
LOCK_NAME = ".owner"
#: The open lock files, by directory (closed when the directory is removed).
_owned: dict[str, int] = {}


def _private_directory() -> str:
    """A new private directory, held by this process (:data:`LOCK_NAME`), after removing
    those of processes gone without their exit handlers (a kill, ``os._exit``): a key left
    in ``/dev/shm`` stays in memory until the machine restarts."""
    parent = (
        SHARED_MEMORY
        if os.path.isdir(SHARED_MEMORY) and os.access(SHARED_MEMORY, os.W_OK)
        else tempfile.gettempdir()
    )
    _remove_orphans(parent)
    directory = tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir=parent)
    # Locked before it has its name: another process never finds it unlocked.
    temporary = os.path.join(directory, LOCK_NAME + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(temporary, os.path.join(directory, LOCK_NAME))
    _owned[directory] = fd
    atexit.register(shutil.rmtree, directory, True)
    return directory


def _remove_orphans(parent: str) -> None:
    """Remove this user's private directories in ``parent`` whose owner is gone (their lock
    is free); those without a lock (being made, or an older engine's) are left alone."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(DIRECTORY_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue
            fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its process is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by an engine that is gone", path)
        finally:
            os.close(fd)


def store_for(source: SdsSource) -> SecretStore:
    """The store of ``source``: the one an engine's stream follows, else fetched now (see
    :func:`fetch`; into the store held before, if any, whose paths stay the same)."""
    with _stores_lock:
        held = _stores.get(source)
        if held is not None and held.closed:  # removed (at exit): a new one
            del _stores[source]
            held = None
        if held is not None and held.followers:
            return held
    pems, version = fetch(source)
    store = held
    if store is None:
        store = SecretStore(source, _private_directory())
        atexit.register(store.close)  # before the directory's own removal (the last resort)
    try:
        store.check(pems)
    except BaseException:
        if held is None:
            store.close()
        raise
    store.commit(pems, version)
    with _stores_lock:
        current = _stores.setdefault(source, store)
        if current.closed:
            current = _stores[source] = store
    if current is not store:  # another thread made one meanwhile, as fresh
        store.close()
    return current


def release_idle() -> None:
    """Remove the stores no engine follows, their directories with them (a process that
    loaded a configuration and serves none of it: the supervisor of ``--workers``)."""
    with _stores_lock:
        idle = [store for store in _stores.values() if not store.followers]
        for store in idle:
            del _stores[store.source]
    for store in idle:
        store.close()


def existing_store(source: SdsSource) -> SecretStore | None:
    """The store :func:`store_for` made for ``source`` in this process, if any."""
    with _stores_lock:
        return _stores.get(source)


def _why_unreachable(source: SdsSource) -> str:
    """A hint for a server that never answered: a socket that is not there, or not one."""
    if source.address.startswith("unix:"):
        path = source.address[len("unix:") :]
        path = "/" + path.lstrip("/") if path.startswith("//") else path
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return f" ({path} does not exist: is istio-agent running, and its socket mounted?)"
        if not stat.S_ISSOCK(mode):
            kind = "directory" if stat.S_ISDIR(mode) else "file"
            return f" ({path} is a {kind}, not a socket: is the socket's directory mounted?)"
    return ""


#: The fetches in flight (their gRPC calls), and whether the process is exiting.
_fetches: set[Any] = set()
_exiting = threading.Event()


def cancel_fetches() -> None:
    """End the fetches in flight, and refuse those to come: the process is exiting, and a
    load waiting for its server (a reload, in a thread) would hold the exit up to its
    ``initialFetchTimeout``."""
    with _stores_lock:
        _exiting.set()
        calls = list(_fetches)
    for call in calls:
        call.cancel()


def fetch(source: SdsSource) -> tuple[dict[str, bytes], str]:
    """Both secrets of ``source`` and the version they came with, waiting for the server up
    to ``initial_fetch_timeout`` (it may start after the engine). Raises
    :class:`SecretRefused` (the server's secrets cannot be used, or none came in time)."""
    deadline = time.monotonic() + source.initial_fetch_timeout
    done = threading.Event()

    def requests() -> Iterator[discovery_pb2.DiscoveryRequest]:
        yield _request(source)
        done.wait()  # a half-closed stream may end before the server answers

    got: dict[str, bytes] = {}
    version = ""
    channel = grpc.insecure_channel(source.address, options=channel_options(source))
    try:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(
            requests(), timeout=max(deadline - time.monotonic(), 0.001), wait_for_ready=True
        )
        with _stores_lock:
            _fetches.add(call)
            if _exiting.is_set():
                call.cancel()
        try:
            for response in call:
                got.update(read_secrets(response, source))
                version = response.version_info
                if all(key in got for key in FIELDS):
                    break
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            waited = f"{source.initial_fetch_timeout:g}s"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                missing = sorted({_secret_name(source, k) for k in FIELDS if k not in got})
                raise SecretRefused(
                    f"no secret {' or '.join(map(repr, missing))} from {source.address} "
                    f"within {waited}{_why_unreachable(source)}"
                ) from None
            if code == grpc.StatusCode.CANCELLED and _exiting.is_set():
                raise SecretRefused(f"{source.address}: not waited for, exiting") from None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise SecretRefused(
                f"{source.address} ended the stream: {code.name if code else ''} {details}"
            ) from None
        finally:
            call.cancel()
            with _stores_lock:
                _fetches.discard(call)
    finally:
        done.set()
        channel.close()
    if not all(key in got for key in FIELDS):
        raise SecretRefused(f"{source.address} ended the stream before sending both secrets")
    return got, version


class SdsWatch:
    """The SDS stream of an engine, in a thread of its own: each secret pushed is checked
    there (off the event loop), then written and rotated in on the loop.

    ``rotate`` is called on the loop with the identity built in the thread once the new
    secrets are written in place (its contexts: the loop only swaps them in), ``refused``
    with why a pushed secret was not taken; ``servers`` (asked from the thread) gives the
    server contexts to build.
    """

    def __init__(
        self,
        store: SecretStore,
        rotate: Callable[[IdentityMaterial], None],
        refused: Callable[[str], None],
        *,
        servers: Callable[[], Iterable[ServerKey]] = lambda: (DEFAULT_SERVER,),
        random_fraction: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.source = store.source
        self._rotate = rotate
        self._refused = refused
        self._servers = servers
        self._random = random_fraction
        self.connected = False
        self.reconnects = 0
        self.acks = 0
        self.nacks = 0
        self.last_error: str | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._call: Any = None
        self._following = False
        self._next_update = 0.0
        #: The secrets last taken and their version (written on the loop soon after).
        self._accepted = dict(store.pems)
        #: Secrets refused since, each the server's latest of its name: tried again with
        #: the next one pushed (see :meth:`_check`).
        self._pending: dict[str, bytes] = {}
        self.version = store.version

    def start(self) -> None:
        """Open the stream, from a thread, for the running loop (the store is followed: a
        load reads it as it is)."""
        self._loop = asyncio.get_running_loop()
        with _stores_lock:
            self.store.followers += 1
            self._following = True
        self._thread = threading.Thread(target=self._run, name="metaprotocol sds", daemon=True)
        self._thread.start()

    def halt(self) -> None:
        """End the stream now, from the loop: nothing it takes after is written, and a load
        no longer reads the store as current. :meth:`stop` then waits for the thread."""
        self._stopping.set()
        call = self._call
        if call is not None:
            call.cancel()
        with _stores_lock:
            if self._following:
                self._following = False
                self.store.followers -= 1

    async def stop(self) -> None:
        """End the stream and its thread."""
        self.halt()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, STOP_WAIT)

    def _run(self) -> None:
        """Keep the stream open until stopped; back off between attempts."""
        failures = 0
        while not self._stopping.is_set():
            opened = time.monotonic()
            try:
                self._session()
                error = "the server closed the stream"
            except grpc.RpcError as exc:
                if self._stopping.is_set():
                    return
                code = exc.code() if isinstance(exc, grpc.Call) else None
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                error = f"{code.name if code else 'error'}: {details}"
            except Exception as exc:  # never let the watch die: log, back off, reconnect
                log.exception("SDS stream to %s failed", self.source.address)
                error = f"{type(exc).__name__}: {exc}"
            self._call = None
            healthy = self.connected and time.monotonic() - opened >= STABLE_STREAM
            self.connected = False
            if self._stopping.is_set():
                return
            self.last_error = error[:MAX_ERROR_DETAIL]
            failures = 1 if healthy else failures + 1
            delay = backoff_delay(failures, BACKOFF_INITIAL, BACKOFF_MAX, self._random())
            log.warning(
                "SDS stream to %s ended (%s); the identity in force is kept; retrying in %.2f s",
                self.source.address,
                self.last_error[:200],
                delay,
            )
            if self._stopping.wait(delay):
                return
            self.reconnects += 1

    def _session(self) -> None:
        """One stream: subscribe, then take responses until it ends (:attr:`connected` once
        the first came)."""
        outgoing: queue.SimpleQueue[discovery_pb2.DiscoveryRequest | None] = queue.SimpleQueue()

        def requests() -> Iterator[discovery_pb2.DiscoveryRequest]:
            while (request := outgoing.get()) is not None:
                yield request

        channel = grpc.insecure_channel(self.source.address, options=channel_options(self.source))
        try:
            call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(requests())
            self._call = call
            if self._stopping.is_set():
                return
            outgoing.put(_request(self.source, self.version))
            for response in call:
                if not self.connected:
                    self.connected, self.last_error = True, None
                pause = self._next_update - time.monotonic()
                if pause > 0 and self._stopping.wait(pause):
                    return
                start = time.monotonic()
                gap = MIN_UPDATE_PAUSE
                try:
                    request, eventful = self._handle(response)
                    gap = MIN_ROTATION_GAP if eventful else MIN_UPDATE_PAUSE
                    outgoing.put(request)
                finally:
                    now = time.monotonic()
                    self._next_update = now + max(now - start, gap)
        finally:
            outgoing.put(None)
            channel.close()

    def _handle(
        self, response: discovery_pb2.DiscoveryResponse
    ) -> tuple[discovery_pb2.DiscoveryRequest, bool]:
        """Take ``response``'s secrets, or refuse them: the ACK or the NACK to send, and
        whether it was eventful (new secrets to rotate in, or a refusal)."""
        material = None
        new: dict[str, bytes] = {}
        try:
            new = read_secrets(response, self.source)
            for key in new:  # the server's latest word on that secret
                self._pending.pop(key, None)
            pems = {**self._accepted, **new}
            if pems != self._accepted:  # files read, contexts built: here, not on the loop
                material, pems = self._check(pems, new)
        except SecretRefused as exc:
            self._pending.update(new)
            error = str(exc)[:MAX_ERROR_DETAIL]
            self.nacks += 1
            self.last_error = error
            log.warning(
                "SDS: secrets from %s refused, the identity in force is kept: %s",
                self.source.address,
                error[:500],
            )
            self._on_loop(self._refused, error)
            nonce = response.nonce[:MAX_VERSION_LENGTH]  # not megabytes back
            return _request(self.source, self.version, nonce, error), True
        self.acks += 1
        rotated = material is not None
        if material is not None:
            self._accepted = pems
            self._pending.clear()
            self._on_loop(self._apply, pems, response.version_info, material)
        self.version = response.version_info
        return _request(self.source, self.version, response.nonce), rotated

    def _check(
        self, pems: dict[str, bytes], new: dict[str, bytes]
    ) -> tuple[IdentityMaterial, dict[str, bytes]]:
        """The identity ``pems`` make, and ``pems``; or, when they cannot be used, the one
        they make with the secret refused last (a root, then a certificate of it, each
        pushed alone: a move to another root), if that can."""
        try:
            return self.store.check(pems, self._servers()), pems
        except SecretRefused:
            paired = {**self._accepted, **self._pending, **new}
            if not self._pending or paired == pems:
                raise
            try:
                return self.store.check(paired, self._servers()), paired
            except SecretRefused:
                pass
            raise

    def _apply(self, pems: dict[str, bytes], version: str, material: IdentityMaterial) -> None:
        """On the loop: write the checked secrets in place and rotate in what the thread
        built from them (the loop's identity check never sees some of the files new and
        others old, and builds nothing). Another engine's stream on the same store may have
        written them already: rotated in all the same."""
        self.store.commit(pems, version)
        if self.store.holds(pems):
            self._rotate(material)

    def _on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` on the loop, unless the watch is halted before it runs (a reload
        naming another server: the engine's identity is no longer this stream's)."""
        loop = self._loop
        if loop is not None and not self._stopping.is_set():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._unless_halted, callback, *args)

    def _unless_halted(self, callback: Callable[..., None], *args: Any) -> None:
        if not self._stopping.is_set():
            callback(*args)

    def dump(self) -> dict[str, Any]:
        """For ``/config_dump``: where the secrets come from and the stream's state."""
        source = self.source
        return {
            "address": source.address,
            "secrets": [source.certificate, source.root],
            "connected": self.connected,
            "version": self.version,
            "acks": self.acks,
            "nacks": self.nacks,
            "reconnects": self.reconnects,
            "lastError": self.last_error,
            "directory": self.store.directory,
        }
