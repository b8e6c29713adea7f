"""The xDS and tracing extras installed together: both sets of generated protos import.

``xds-protos`` also ships OpenTelemetry's protos of 2021 under ``opentelemetry/proto/``; pip
lets them replace ``opentelemetry-proto``'s files when it installs ``xds-protos`` second
(grpc/grpc#42428), and the OTLP exporter then fails to import. ``./dev`` reinstalls
``opentelemetry-proto`` last; docs/xds.md tells users the same.
"""

from __future__ import annotations


def test_envoy_and_opentelemetry_protos_import_together() -> None:
    from envoy.service.discovery.v3 import ads_pb2_grpc  # noqa: F401
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope"), (
        "xds-protos replaced opentelemetry-proto's files: "
        "pip install --force-reinstall --no-deps opentelemetry-proto"
    )
