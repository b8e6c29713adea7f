"""Istio's TCP metadata exchange (ALPN ``istio-peer-exchange``) on the engine's mesh listeners:
clients built on the protobuf library's own Any and Struct (tests/mesh_pki.py), as Istio's
metadata_exchange filter writes and reads them; hostile headers. Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mesh_pki import ALPN_SIDECAR, EXCHANGE_MAGIC, SIDECAR_METADATA, MeshCa, exchange_header
from proxy_kit import WAIT, Client, Upstream, address, engine_for, error_type, mesh, run, until
from test_mesh_identity import identity
from test_telemetry import ROUTER, istio_series

from metaprotocol_sdk.examples.kv import REQUEST, KVCodec, build_frame
from metaprotocol_sdk.metadata import Metadata
from metaprotocol_sdk.proxy.peer_exchange import (
    MAX_FIELDS,
    MAX_HEADER,
    STRUCT_TYPE,
    _varint,
    read_exchange,
)

LISTENER = "svc.test:9000"
WORKLOAD = (
    "  telemetry:\n    istioMetrics: true\n    reporter: destination\n"
    "    workload: {name: gateway, namespace: meta, app: gateway, version: v7,\n"
    "               canonicalService: gateway, canonicalRevision: v7}\n"
)


@pytest.fixture
def ca() -> MeshCa:
    return MeshCa()


def config(ca: MeshCa, tmp: Path, port: int) -> str:
    if not (tmp / "certs").exists():
        ca.write(tmp / "certs", "engine", ns="meta")
    return mesh(
        [(port, "v1")],
        router=ROUTER,
        proxy=identity(tmp / "certs") + WORKLOAD.replace("  telemetry", "telemetry", 1),
    )


def sidecar(ca: MeshCa, tmp: Path, alpn: list[str] = ALPN_SIDECAR) -> ssl.SSLContext:
    ctx = ca.client_context(tmp / "clients", None, alpn)
    ctx.load_cert_chain(*ca.files(tmp / "clients", "frontend", "web"))
    return ctx


async def raw(
    engine: Any, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(*address(engine), ssl=ctx), WAIT)


async def reply(reader: asyncio.StreamReader, buffer: bytearray) -> Metadata:
    codec = KVCodec()
    while True:
        msg = codec.decode(buffer)
        if isinstance(msg, Metadata):
            return msg
        chunk = await asyncio.wait_for(reader.read(65536), WAIT)
        assert chunk, "closed"
        buffer += chunk


def test_a_sidecar_client_and_the_engine_exchange_their_workloads(
    ca: MeshCa, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine selects ALPN istio-peer-exchange, sends its own workload before its first
    reply (what a sidecar's filter reads: NAME, NAMESPACE, WORKLOAD_NAME, CLUSTER_ID, LABELS,
    OWNER), and reports the client's in the source labels of its requests."""
    monkeypatch.setenv("POD_NAME", "gateway-5f7b-abcde")

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            client = await Client.connect(address(engine), ssl=sidecar(ca, tmp_path))
            assert error_type(await client.call("get")) is None
            said = client.peer_metadata
            assert said is not None
            assert said["x-envoy-peer-metadata"] == {
                "NAME": "gateway-5f7b-abcde",
                "NAMESPACE": "meta",
                "WORKLOAD_NAME": "gateway",
                "CLUSTER_ID": "Kubernetes",
                "LABELS": {
                    "app": "gateway",
                    "version": "v7",
                    "service.istio.io/canonical-name": "gateway",
                    "service.istio.io/canonical-revision": "v7",
                },
                "OWNER": "kubernetes://apis/apps/v1/namespaces/meta/deployments/gateway",
            }
            (series,) = [s for s in istio_series(engine) if s["response_code"] == "200"]
            assert series["source_workload"] == SIDECAR_METADATA["WORKLOAD_NAME"]
            assert series["source_app"] == "frontend" and series["source_version"] == "v3"
            assert series["destination_workload"] == "gateway"
            client.close()
        await up.close()

    run(main())


def test_a_header_in_single_bytes_and_a_client_that_sends_none(ca: MeshCa, tmp_path: Path) -> None:
    """The header is read across reads of one byte; a client that selected the exchange but
    starts with its own bytes is served (they are its codec's, as Envoy's filter passes
    them on), after the engine's header."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            reader, writer = await raw(engine, sidecar(ca, tmp_path))
            for byte in exchange_header(SIDECAR_METADATA) + build_frame(
                REQUEST, 7, {"method": "get"}
            ):
                writer.write(bytes([byte]))
                await writer.drain()
            buffer = bytearray()
            while len(buffer) < 8 or len(buffer) < 8 + int.from_bytes(buffer[4:8], "big"):
                buffer += await asyncio.wait_for(reader.read(65536), WAIT)
            assert int.from_bytes(buffer[:4], "big") == EXCHANGE_MAGIC
            del buffer[: 8 + int.from_bytes(buffer[4:8], "big")]
            assert (await reply(reader, buffer)).request_id == 7
            writer.close()
            reader, writer = await raw(engine, sidecar(ca, tmp_path))
            writer.write(build_frame(REQUEST, 9, {"method": "get"}))
            buffer = bytearray()
            while len(buffer) < 8:
                buffer += await asyncio.wait_for(reader.read(65536), WAIT)
            assert int.from_bytes(buffer[:4], "big") == EXCHANGE_MAGIC
            del buffer[: 8 + int.from_bytes(buffer[4:8], "big")]
            msg = await reply(reader, buffer)
            assert msg.request_id == 9 and error_type(msg) is None
            writer.close()
        await up.close()

    run(main())


def test_a_header_above_its_bound_closes_the_connection(ca: MeshCa, tmp_path: Path) -> None:
    """A client announcing a header above MAX_HEADER bytes is closed at once (counted), not
    buffered: its length would otherwise decide what the engine holds."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            reader, writer = await raw(engine, sidecar(ca, tmp_path))
            writer.write(struct.pack(">II", EXCHANGE_MAGIC, MAX_HEADER + 1) + b"x" * 100)
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
            closed = engine.stats.get(
                "metaprotocol_downstream_connections_closed_total",
                listener=LISTENER,
                reason="peer_exchange",
            )
            assert closed == 1
            assert len(up.received) == 0
            writer.close()
        await up.close()

    run(main())


def test_a_malformed_exchange_is_served_without_its_labels(ca: MeshCa, tmp_path: Path) -> None:
    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            reader, writer = await raw(engine, sidecar(ca, tmp_path))
            body = b"\x0a\xff\xff\xff\xff\x0f" + os.urandom(20)  # a length past the end
            writer.write(struct.pack(">II", EXCHANGE_MAGIC, len(body)) + body)
            writer.write(build_frame(REQUEST, 3, {"method": "get"}))
            buffer = bytearray()
            while len(buffer) < 8:
                buffer += await asyncio.wait_for(reader.read(65536), WAIT)
            del buffer[: 8 + int.from_bytes(buffer[4:8], "big")]
            assert error_type(await reply(reader, buffer)) is None
            (series,) = [s for s in istio_series(engine) if s["response_code"] == "200"]
            assert series["source_workload"] == "unknown"
            writer.close()
        await up.close()

    run(main())


def test_clients_saying_ever_new_workloads_stay_within_the_bound(
    ca: MeshCa, tmp_path: Path
) -> None:
    """Each new workload a client says is a new label set: past the identities' bound they
    are not reported (the series do not grow with what clients say)."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            assert engine.istio is not None
            engine.istio.max_identities = 5
            for n in range(12):
                said = {**SIDECAR_METADATA, "WORKLOAD_NAME": f"w{n}"}
                client = await Client.connect(
                    address(engine), ssl=sidecar(ca, tmp_path), metadata=said
                )
                assert error_type(await client.call("get")) is None
                client.close()
            workloads = {s["source_workload"] for s in istio_series(engine)}
            assert len(workloads - {"unknown"}) == 5
        await up.close()

    run(main())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_any_bytes_are_read_or_refused_never_raise(data: bytes) -> None:
    """Hostile input: whatever the bytes, reading them returns a workload or None."""
    found = read_exchange(data)
    assert found is None or found.workload is not None


def _cost(header: bytes) -> float:
    """The best of several reads of ``header`` (an Any), in seconds."""
    import time

    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        read_exchange(header)
        best = min(best, time.perf_counter() - start)
    return best


def _labels(count: int) -> bytes:
    labels = {f"k{i}": "v" * 10 for i in range(count)}
    return exchange_header({**SIDECAR_METADATA, "LABELS": labels})[8:]


def test_reading_is_linear_in_the_header() -> None:
    """Many fields (as many as are read): read in time linear in them, as a ratio."""
    assert read_exchange(_labels(300)) is not None
    assert _cost(_labels(300)) / _cost(_labels(75)) < 8  # 4x the input: linear is 4x


def test_a_header_of_many_fields_costs_about_a_handshake_at_most() -> None:
    """Hostile header: 64 KiB of two-byte fields took the event loop about 11 ms to walk
    (some 30 TLS handshakes) for every connection. At most MAX_FIELDS fields are read: one
    with more is malformed (served without labels), and the longest header costs a few
    times a sidecar's (whose fields, and those of one sending 300 labels, are all read)."""
    hostile = b"\x08\x01" * (MAX_HEADER // 2)
    assert read_exchange(hostile) is None
    assert read_exchange(_labels(MAX_FIELDS)) is None
    sidecar_header = exchange_header(SIDECAR_METADATA)[8:]
    assert read_exchange(sidecar_header) is not None
    assert _cost(hostile) / _cost(sidecar_header) < 40  # it was about 380


def test_a_header_begun_is_bounded_as_a_partial_frame(ca: MeshCa, tmp_path: Path) -> None:
    """Hostile client: part of a header, then nothing. It is held as a partial frame is:
    in the buffer budget, and closed at ``timeouts.frame`` (``frame_timeout``), not left
    open until ``timeouts.idle``."""

    async def main() -> None:
        up = await Upstream("v1").start()
        text = config(ca, tmp_path, up.port).replace(
            "  telemetry:", "  timeouts: {frame: 0.5s, idle: 60s}\n  telemetry:", 1
        )
        async with engine_for(text) as engine:
            reader, writer = await raw(engine, sidecar(ca, tmp_path))
            begun = exchange_header(SIDECAR_METADATA)[:20]
            writer.write(begun)
            await until(lambda: engine.buffered == len(begun), "the header's bytes held")
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
            closed = engine.stats.get(
                "metaprotocol_downstream_connections_closed_total",
                listener=LISTENER,
                reason="frame_timeout",
            )
            assert closed == 1 and engine.buffered == 0
            writer.close()
        await up.close()

    run(main())


def test_the_labels_are_read_as_istios_stats_filter_reads_them(ca: MeshCa, tmp_path: Path) -> None:
    """As Istio (its ``convertStructToWorkloadMetadata`` and stats filter): the namespace of
    the client's certificate before the one it says; ``app.kubernetes.io/name`` and
    ``/version`` before ``app`` and ``version``; no canonical-name label: ``unknown`` (not
    the workload's name), no canonical-revision: ``latest``."""

    async def main() -> None:
        up = await Upstream("v1").start()
        async with engine_for(config(ca, tmp_path, up.port)) as engine:
            said = {
                **SIDECAR_METADATA,
                "NAMESPACE": "payments",  # the certificate says web
                "LABELS": {
                    "app": "frontend",
                    "app.kubernetes.io/name": "shop",
                    "version": "v3",
                    "app.kubernetes.io/version": "v9",
                },
            }
            client = await Client.connect(address(engine), ssl=sidecar(ca, tmp_path), metadata=said)
            assert error_type(await client.call("get")) is None
            (series,) = [s for s in istio_series(engine) if s["response_code"] == "200"]
            assert series["source_workload_namespace"] == "web"
            assert series["source_app"] == "shop" and series["source_version"] == "v9"
            assert series["source_canonical_service"] == "unknown"
            assert series["source_canonical_revision"] == "latest"
            assert series["source_workload"] == "frontend"
            client.close()
        await up.close()

    run(main())


def test_repeated_keys_and_values_are_read_as_protobuf_parses_them() -> None:
    """Protobuf (the library Istio's filter parses with) is the oracle: of a map key said
    twice the last wins, and of a Value's one-of fields the last set."""
    from google.protobuf import any_pb2, struct_pb2

    def body(struct: bytes) -> bytes:
        return any_pb2.Any(type_url=STRUCT_TYPE, value=struct).SerializeToString()

    def top(workload: str) -> bytes:
        data = struct_pb2.Struct()
        data.fields["x-envoy-peer-metadata"].struct_value.update(
            {**SIDECAR_METADATA, "WORKLOAD_NAME": workload}
        )
        return data.SerializeToString()

    twice = top("first") + top("last")  # the map entry twice
    parsed = struct_pb2.Struct.FromString(twice)
    assert parsed.fields["x-envoy-peer-metadata"].struct_value["WORKLOAD_NAME"] == "last"
    found = read_exchange(body(twice))
    assert found is not None and found.workload == "last"

    # A Value that is a Struct, then a string: protobuf says a string (no workload in it).
    value = struct_pb2.Value()
    value.struct_value.update(SIDECAR_METADATA)
    both = value.SerializeToString() + struct_pb2.Value(string_value="x").SerializeToString()
    assert struct_pb2.Value.FromString(both).WhichOneof("kind") == "string_value"
    key = b"x-envoy-peer-metadata"
    entry = b"\x0a" + bytes([len(key)]) + key + b"\x12" + _varint(len(both)) + both
    struct = b"\x0a" + _varint(len(entry)) + entry
    assert "x-envoy-peer-metadata" in struct_pb2.Struct.FromString(struct).fields
    assert read_exchange(body(struct)) is None


def test_an_engine_without_a_workload_name_says_no_owner() -> None:
    """As Istio's ``convertWorkloadMetadataToStruct``: what is not known is not written (an
    OWNER naming no deployment, ``.../namespaces//deployments/``, was); LABELS always is (the
    canonical revision ``latest``, as the injector labels a pod without a version)."""
    from mesh_pki import read_exchange as protobuf_read

    from metaprotocol_sdk.proxy.config.models import Workload
    from metaprotocol_sdk.proxy.peer_exchange import exchange_header as engine_header

    said = protobuf_read(bytearray(engine_header(Workload(), "pod-1")))
    assert said == {
        "x-envoy-peer-metadata": {
            "NAME": "pod-1",
            "CLUSTER_ID": "Kubernetes",
            "LABELS": {"service.istio.io/canonical-revision": "latest"},
        }
    }
