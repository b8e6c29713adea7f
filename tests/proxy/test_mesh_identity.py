"""Istio mutual TLS (``ISTIO_MUTUAL``) with the workload identity istio-agent writes as files
(``spec.meshIdentity``), with the KV codec over real sockets on 127.0.0.1: origination to a
mesh server (SNI, ALPN, names), termination for mesh clients, rotation of the files without a
reload, and the configuration's checks. The mesh CA and the SPIFFE workload certificates are
made with ``cryptography``, as istiod's CA makes them."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from mesh_pki import ALPN_SIDECAR, SIDECAR_METADATA, MeshCa, exchange_header, spiffe
from proxy_kit import WAIT, Client, Upstream, address, engine_for, error_type, http_get, mesh, run

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import loads_config
from metaprotocol_sdk.proxy.identity import MAX_SERVER_CONTEXTS
from metaprotocol_sdk.proxy.upstream import UpstreamConnection


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


def identity(directory: Path, interval: str = "100ms") -> str:
    return f"meshIdentity: {{directory: '{directory}', checkInterval: {interval}}}\n"


def peer_uris(transport: Any) -> list[str]:
    cert = transport.get_extra_info("peercert") or {}
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]


def peer_serial(transport: Any) -> int:
    der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return int(x509.load_der_x509_certificate(der).serial_number)


class Sni:
    """Records the SNI of each connection a server context accepts."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.names: list[str | None] = []
        ctx.sni_callback = self._seen

    def _seen(self, sock: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        self.names.append(name)


async def until(condition: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


def rotations(engine: Any, result: str) -> int:
    return int(engine.stats.get("metaprotocol_tls_identity_rotations_total", result=result) or 0)


# -- upstream: DestinationRule tls.mode ISTIO_MUTUAL -------------------------------------------


def with_sans(text: str, *sans: str) -> str:
    """``text`` with the ServiceEntry's ``subjectAltNames``."""
    return text.replace(
        "  resolution: STATIC", f"  subjectAltNames: {json.dumps(list(sans))}\n  resolution: STATIC"
    )


def test_istio_mutual_presents_the_identity_sends_istios_sni_and_alpn_and_checks_the_names(
    ca: MeshCa, tmp_path: Path
) -> None:
    """The workload certificate is presented, the server's is checked against the mesh root
    and the ServiceEntry's names, the SNI is istiod's ``outbound_.<port>_.<subset>_.<host>``,
    and the engine offers a sidecar's ALPN, ``istio-peer-exchange`` first: a sidecar server
    selects it and reads the engine's metadata exchange header (test_upstream_exchange.py)."""
    ca.write(tmp_path / "certs", "engine")
    server = ca.server_context(tmp_path, "greeter", alpn=ALPN_SIDECAR)
    sni = Sni(server)

    async def main() -> None:
        up = Upstream("v1")
        up.exchange = exchange_header(SIDECAR_METADATA)  # a sidecar's metadata exchange
        await up.start(ssl=server)
        policy = "{tls: {mode: ISTIO_MUTUAL}}"
        text = with_sans(
            mesh([(up.port, "v1")], traffic_policy=policy, proxy=identity(tmp_path / "certs")),
            spiffe("greeter"),
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("get", rid=7)
            assert reply.request_id == 7 and error_type(reply) is None
            conn = next(iter(up.connections))
            assert conn.transport is not None
            assert peer_uris(conn.transport) == [spiffe("engine")]
            ssl_object = conn.transport.get_extra_info("ssl_object")
            assert ssl_object.selected_alpn_protocol() == "istio-peer-exchange"
            assert len(up.peers) == 1
            cluster = engine.clusters["outbound|9000||svc.test"]
            assert cluster.tls is not None and cluster.tls.subject_alt_names == (spiffe("greeter"),)
            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            dump = json.loads(body)
            tls = next(c for c in dump["clusters"] if c["name"] == cluster.name)["tls"]
            assert tls["mode"] == "ISTIO_MUTUAL" and tls["sni"] == "outbound_.9000_._.svc.test"
            assert tls["peerExchange"] is True
            assert dump["meshIdentity"]["certificateChain"].endswith("cert-chain.pem")
            assert "BEGIN" not in body
            client.close()
        await up.close()
        assert sni.names == ["outbound_.9000_._.svc.test"]

    run(main())


def test_istio_mutual_sni_of_a_subset(ca: MeshCa, tmp_path: Path) -> None:
    ca.write(tmp_path / "certs", "engine")
    server = ca.server_context(tmp_path, "greeter")
    sni = Sni(server)

    async def main() -> None:
        up = await Upstream("v1").start(ssl=server)
        router = "- name: r\n  route: [{destination: {host: svc.test, subset: v1}}]\n"
        text = mesh(
            [(up.port, "v1")],
            router=router,
            traffic_policy="{tls: {mode: ISTIO_MUTUAL}}",
            proxy=identity(tmp_path / "certs"),
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            client.close()
        await up.close()
        assert sni.names == ["outbound_.9000_.v1_.svc.test"]

    run(main())


@pytest.mark.parametrize("where", ["ServiceEntry", "DestinationRule"])
def test_istio_mutual_refuses_a_server_of_another_identity(
    ca: MeshCa, tmp_path: Path, where: str
) -> None:
    """A mesh certificate chains to the root whoever holds it: the names decide. The
    DestinationRule's subjectAltNames take precedence over the ServiceEntry's (Istio)."""
    ca.write(tmp_path / "certs", "engine")
    server = ca.server_context(tmp_path, "impostor")

    async def main() -> None:
        up = await Upstream("v1").start(ssl=server)
        if where == "ServiceEntry":
            policy = "{tls: {mode: ISTIO_MUTUAL}}"
            sans: tuple[str, ...] = (spiffe("greeter"),)
        else:  # the rule's names win over the ServiceEntry's, which would admit the impostor
            names = json.dumps([spiffe("greeter")])
            policy = "{tls: {mode: ISTIO_MUTUAL, subjectAltNames: " + names + "}}"
            sans = (spiffe("impostor"),)
        text = with_sans(
            mesh([(up.port, "v1")], traffic_policy=policy, proxy=identity(tmp_path / "certs")),
            *sans,
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("get", rid=3)
            assert reply.request_id == 3 and error_type(reply) == "UpstreamConnectFailure"
            assert "match none of subjectAltNames" in reply.attributes.get(
                "error-message", str(reply)
            )
            cluster = "outbound|9000||svc.test"
            assert (
                engine.stats.get(
                    "metaprotocol_tls_handshake_errors_total",
                    cluster=cluster,
                    reason="bad_certificate",
                )
                == 1
            )
            client.close()
        await up.close()
        assert up.received == []

    run(main())


def test_istio_mutual_refuses_a_server_of_another_mesh(ca: MeshCa, tmp_path: Path) -> None:
    ca.write(tmp_path / "certs", "engine")
    server = MeshCa("other-root").server_context(tmp_path / "other", "greeter")

    async def main() -> None:
        up = await Upstream("v1").start(ssl=server)
        text = mesh(
            [(up.port, "v1")],
            traffic_policy="{tls: {mode: ISTIO_MUTUAL}}",
            proxy=identity(tmp_path / "certs"),
        )
        async with engine_for(text) as engine:
            client = await Client.connect(address(engine))
            reply = await client.call("get")
            assert error_type(reply) == "UpstreamConnectFailure"
            client.close()
        await up.close()

    run(main())


# -- downstream: a listener's tls.mode ISTIO_MUTUAL --------------------------------------------


def mesh_listener(ca: MeshCa, tmp_path: Path, port: int, extra: str = "") -> str:
    ca.write(tmp_path / "certs", "engine")
    return mesh(
        [(port, "v1")],
        listener_tls="{mode: ISTIO_MUTUAL" + extra + "}",
        proxy=identity(tmp_path / "certs"),
    )


def test_istio_mutual_listener_serves_mesh_clients_with_and_without_alpn(
    ca: MeshCa, tmp_path: Path
) -> None:
    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(mesh_listener(ca, tmp_path, up.port)) as engine:
            for alpn, selected in (
                (ALPN_SIDECAR, "istio-peer-exchange"),  # then the metadata exchange
                (["istio"], "istio"),
                (None, None),
                (["h2"], None),
            ):
                client = await Client.connect(
                    address(engine), ssl=ca.client_context(tmp_path, "frontend", alpn)
                )
                assert client.transport is not None
                tls = client.transport.get_extra_info("ssl_object")
                assert tls.selected_alpn_protocol() == selected
                assert peer_uris(client.transport) == [spiffe("engine")]
                assert error_type(await client.call("get")) is None
                client.close()
            listener = "svc.test:9000"
            assert engine.stats.get("metaprotocol_tls_handshakes_total", listener=listener) == 4
        await up.close()

    run(main())


@pytest.mark.parametrize("client", ["no_certificate", "other_mesh", "wrong_name"])
def test_istio_mutual_listener_refuses(ca: MeshCa, tmp_path: Path, client: str) -> None:
    """A client without a certificate, or with one of another root, is refused in the
    handshake; one of a name the listener's subjectAltNames do not list, after it."""
    reasons = {
        "no_certificate": "no_client_certificate",
        "other_mesh": "bad_certificate",
        "wrong_name": "bad_certificate",
    }

    async def main() -> None:
        up = await Upstream("v1").start()
        extra = ", subjectAltNames: " + json.dumps([spiffe("frontend")])
        async with engine_for(mesh_listener(ca, tmp_path, up.port, extra)) as engine:
            if client == "no_certificate":
                ctx = ca.client_context(tmp_path, None)
            elif client == "other_mesh":
                other = MeshCa("other-root")
                ctx = other.client_context(tmp_path / "other", "frontend")
                ctx.load_verify_locations(cadata=ca.pem.decode())
            else:
                ctx = ca.client_context(tmp_path, "intruder")
            served = False
            try:
                conn = await Client.connect(address(engine), ssl=ctx)
                reply = await asyncio.wait_for(conn.call("get"), WAIT)
                served = error_type(reply) is None
                conn.close()
            except (OSError, asyncio.IncompleteReadError, EOFError, ConnectionError):
                pass
            assert not served
            listener = "svc.test:9000"
            await until(
                lambda: (
                    engine.stats.get(
                        "metaprotocol_tls_handshake_errors_total",
                        listener=listener,
                        reason=reasons[client],
                    )
                    == 1
                )
            )
        await up.close()
        assert up.received == []

    run(main())


# -- rotation without a reload -----------------------------------------------------------------


def test_a_rotated_identity_serves_the_next_connections_without_a_reload(
    ca: MeshCa, tmp_path: Path
) -> None:
    """istio-agent rewrites the files: the listener's next connections get the new
    certificate, open ones keep theirs; the next upstream connection presents the new one;
    the rotation is counted and its expiry shown."""
    certs = tmp_path / "certs"
    first = ca.write(certs, "engine")
    server = ca.server_context(tmp_path, "greeter")

    async def main() -> None:
        up = await Upstream("v1").start(ssl=server)
        text = mesh(
            [(up.port, "v1")],
            traffic_policy="{tls: {mode: ISTIO_MUTUAL}}",
            listener_tls="{mode: ISTIO_MUTUAL}",
            proxy=identity(certs),
        )
        async with engine_for(text) as engine:
            before = await Client.connect(
                address(engine), ssl=ca.client_context(tmp_path, "frontend")
            )
            assert before.transport is not None and peer_serial(before.transport) == first
            assert error_type(await before.call("get")) is None
            (old_up,) = up.connections
            assert old_up.transport is not None and peer_serial(old_up.transport) == first
            expiry = "metaprotocol_tls_certificate_expiry_seconds"
            old_expiry = engine.stats.get(
                expiry, identity="mesh", certificate=str(certs / "cert-chain.pem")
            )
            assert old_expiry

            second = ca.write(certs, "engine", hours=48)
            await until(lambda: rotations(engine, "ok") == 1)
            assert (
                engine.stats.get(expiry, identity="mesh", certificate=str(certs / "cert-chain.pem"))
                > old_expiry + 20 * 3600
            )

            after = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert after.transport is not None and peer_serial(after.transport) == second
            assert error_type(await after.call("get")) is None
            assert error_type(await before.call("get")) is None  # still open, still served
            # The upstream connection open before stays; a new one presents the new identity.
            assert old_up.transport is not None
            old_up.transport.close()
            await until(lambda: not engine.upstreams)
            assert error_type(await after.call("get")) is None
            new_up = next(c for c in up.connections if c is not old_up)
            assert new_up.transport is not None and peer_serial(new_up.transport) == second
            assert rotations(engine, "failed") == 0
            before.close()
            after.close()
        await up.close()

    run(main())


@pytest.mark.parametrize(
    "broken", ["mismatched", "half_written", "removed", "expired", "another_ca", "huge"]
)
def test_a_broken_rotation_keeps_the_identity_in_force_and_is_counted(
    ca: MeshCa, tmp_path: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    certs = tmp_path / "certs"
    first = ca.write(certs, "engine")

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh([(up.port, "v1")], listener_tls="{mode: ISTIO_MUTUAL}", proxy=identity(certs))
        async with engine_for(text) as engine:
            chain, key, _ = ca.workload("engine")
            if broken == "mismatched":  # a new certificate, the old key
                (certs / "cert-chain.pem").write_bytes(chain)
            elif broken == "half_written":
                (certs / "cert-chain.pem").write_bytes(chain)
                (certs / "key.pem").write_bytes(key[: len(key) // 2])
            elif broken == "removed":
                (certs / "key.pem").unlink()
            elif broken == "huge":  # over the bound of a PEM file
                (certs / "cert-chain.pem").write_bytes(chain * (2**20 // len(chain) + 1))
            else:  # served, it broke every new connection: peers refuse it
                if broken == "expired":  # 36 s ago
                    bad_chain, bad_key, _ = ca.workload("engine", hours=-0.01)
                else:
                    bad_chain, bad_key, _ = MeshCa("another").workload("engine")
                (certs / "cert-chain.pem").write_bytes(bad_chain)
                (certs / "key.pem").write_bytes(bad_key)
            with caplog.at_level(logging.WARNING, logger="metaprotocol.proxy"):
                await until(lambda: rotations(engine, "failed") == 1)
            assert "the one in force is kept" in caplog.text
            assert rotations(engine, "ok") == 0
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == first
            assert error_type(await conn.call("get")) is None
            conn.close()
            assert engine.admin_address is not None
            _, body = await http_get(engine.admin_address, "/config_dump")
            assert json.loads(body)["meshIdentity"]["lastRotationError"]
            # Counted once, not at every check; then the files are made whole again.
            watch = engine.identity
            assert watch is not None
            mark = watch.next_check
            await until(lambda: watch.next_check > mark + 0.25)  # three checks more
            assert rotations(engine, "failed") == 1
            (certs / "key.pem").write_bytes(key)
            (certs / "cert-chain.pem").write_bytes(chain)
            await until(lambda: rotations(engine, "ok") == 1)
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) != first
            conn.close()
            assert rotations(engine, "failed") == 1
        await up.close()

    run(main())


def test_the_identity_is_kept_across_a_reload_and_follows_the_files(
    ca: MeshCa, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    ca.write(certs, "engine")

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh([(up.port, "v1")], listener_tls="{mode: ISTIO_MUTUAL}", proxy=identity(certs))
        async with engine_for(text) as engine:
            watch = engine.identity
            await engine.apply(loads_config(text, "test.yaml"))
            assert engine.identity is watch
            second = ca.write(certs, "engine")
            await until(lambda: rotations(engine, "ok") == 1)
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == second
            conn.close()
            # Without an identity and ISTIO_MUTUAL, the reload removes its series.
            await engine.apply(loads_config(mesh([(up.port, "v1")]), "test.yaml"))
            assert engine.identity is None
            assert not engine.stats.counters("metaprotocol_tls_certificate_expiry_seconds")
        await up.close()

    run(main())


def test_a_rotation_during_a_reload_is_served_by_the_reloaded_listeners(
    ca: MeshCa, tmp_path: Path
) -> None:
    """The files rotate while a reload awaits (it binds, it checks its addresses): the
    rotation gave the serving listeners the new files, and the reload then put back the
    contexts its listeners were built with: the old certificate was served until the next
    rotation, hours later, maybe after it expired."""
    certs = tmp_path / "certs"
    first = ca.write(certs, "engine")

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh([(up.port, "v1")], listener_tls="{mode: ISTIO_MUTUAL}", proxy=identity(certs))
        async with engine_for(text) as engine:
            staging = engine._refuse_own_listeners
            serials: list[int] = []

            async def rotating(*args: Any) -> None:
                serials.append(ca.write(certs, "engine"))
                await until(lambda: rotations(engine, "ok") == 1)  # the engine's sweep
                await staging(*args)

            engine._refuse_own_listeners = rotating  # type: ignore[method-assign]
            await engine.apply(loads_config(text, "test.yaml"))
            (second,) = serials
            assert second != first
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == second
            conn.close()
        await up.close()

    run(main())


def test_a_rotation_serves_the_new_files_on_a_listener_whose_context_was_not_kept(
    ca: MeshCa, tmp_path: Path
) -> None:
    """The identity keeps its most recently used server contexts only (a control plane can
    ask for new TLS settings at each update); a listener whose context was let go is given
    one built from the rotated files, not left with the old certificate."""
    certs = tmp_path / "certs"
    first = ca.write(certs, "engine")

    async def main() -> None:
        up = await Upstream("v1").start()
        text = mesh(
            [(up.port, "v1")],
            listener_tls="{mode: ISTIO_MUTUAL, minProtocolVersion: TLSV1_3}",  # not the default
            proxy=identity(certs),
        )
        async with engine_for(text) as engine:
            assert engine.identity is not None
            material = engine.identity.material
            for i in range(MAX_SERVER_CONTEXTS + 1):  # other listeners' settings, newer
                material.server(("TLSV1_2", None, ("AES128-GCM-SHA256",) * (i + 1)))
            second = ca.write(certs, "engine", hours=48)
            await until(lambda: rotations(engine, "ok") == 1)
            conn = await Client.connect(address(engine), ssl=ca.client_context(tmp_path, "x"))
            assert conn.transport is not None and peer_serial(conn.transport) == second != first
            assert error_type(await conn.call("get")) is None
            assert len(engine.identity.material.servers) <= MAX_SERVER_CONTEXTS
            conn.close()
        await up.close()

    run(main())


def test_without_a_mesh_identity_nothing_is_watched() -> None:
    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(mesh([(up.port, "v1")])) as engine:
            assert engine.identity is None
            client = await Client.connect(address(engine))
            assert error_type(await client.call("get")) is None
            assert type(next(iter(engine.upstreams))) is UpstreamConnection
            assert not engine.stats.counters("metaprotocol_tls_identity_rotations_total")
            client.close()
        await up.close()

    run(main())


# -- configuration -----------------------------------------------------------------------------


def load_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        loads_config(text, "test.yaml")
    return caught.value


@pytest.mark.parametrize(
    "policy,listener,field,words",
    [
        ("{tls: {mode: ISTIO_MUTUAL}}", "", "spec.trafficPolicy.tls.mode", "set spec.meshIdentity"),
        ("{}", "{mode: ISTIO_MUTUAL}", "spec.listeners[0].tls.mode", "set spec.meshIdentity"),
    ],
)
def test_istio_mutual_without_an_identity_says_what_to_configure(
    policy: str, listener: str, field: str, words: str
) -> None:
    exc = load_error(mesh([(1, "v1")], traffic_policy=policy, listener_tls=listener))
    assert exc.field == field and words in str(exc) and "/etc/certs/cert-chain.pem" in str(exc)


def test_the_identity_files_are_checked_at_load(ca: MeshCa, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    ca.write(certs, "engine")
    other_key = ca.workload("other")[1]
    (certs / "key.pem").write_bytes(other_key)
    exc = load_error(mesh([(1, "v1")], proxy=identity(certs)))
    assert exc.field == "spec.meshIdentity.privateKey" and "is not the key of" in str(exc)
    (certs / "root-cert.pem").unlink()
    exc = load_error(mesh([(1, "v1")], proxy=identity(certs)))
    assert exc.field == "spec.meshIdentity.rootCertificates" and "root-cert.pem" in str(exc)
    exc = load_error(mesh([(1, "v1")], proxy=identity(certs, "10ms")))
    assert exc.field == "spec.meshIdentity.checkInterval"
    MeshCa("another").write(certs, "engine")
    (certs / "root-cert.pem").write_bytes(ca.pem)
    exc = load_error(mesh([(1, "v1")], proxy=identity(certs)))
    assert exc.field == "spec.meshIdentity.certificateChain"
    assert "unable to get local issuer certificate" in str(exc)
    ca.write(certs, "engine", hours=-0.01)
    exc = load_error(mesh([(1, "v1")], proxy=identity(certs)))
    assert exc.field == "spec.meshIdentity.certificateChain" and "expired" in str(exc)


@pytest.mark.parametrize("key", ["clientCertificate", "caCertificates", "insecureSkipVerify"])
def test_istio_mutual_takes_no_files(ca: MeshCa, tmp_path: Path, key: str) -> None:
    ca.write(tmp_path / "certs", "engine")
    value = "true" if key == "insecureSkipVerify" else "/etc/certs/x.pem"
    policy = "{tls: {mode: ISTIO_MUTUAL, " + f"{key}: {value}" + "}}"
    exc = load_error(mesh([(1, "v1")], traffic_policy=policy, proxy=identity(tmp_path / "certs")))
    assert exc.field == f"spec.trafficPolicy.tls.{key}" and "not with mode ISTIO_MUTUAL" in str(exc)


def test_istio_mutual_with_no_server_names_is_cautioned(
    ca: MeshCa, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca.write(tmp_path / "certs", "engine")
    text = mesh(
        [(1, "v1")],
        traffic_policy="{tls: {mode: ISTIO_MUTUAL}}",
        proxy=identity(tmp_path / "certs"),
    )
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        loads_config(text, "test.yaml")
    assert "any workload certificate of the mesh is accepted" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metaprotocol.config"):
        loads_config(with_sans(text, spiffe("greeter")), "test.yaml")
    assert "any workload certificate" not in caplog.text
