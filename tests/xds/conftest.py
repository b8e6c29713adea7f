"""Make the test control plane and snapshots importable (pytest runs in importlib mode), and
the fixtures several modules share: the control plane and three thriftpy2 servers.

These tests need the ``xds`` extra (grpcio, xds-protos); without it they are skipped (failed
under ``./dev test``, see ``peer_check``).
"""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from peer_check import missing

try:
    import envoy.service.discovery.v3.ads_pb2_grpc  # noqa: F401
except ImportError:
    missing("the xds extra (grpcio, xds-protos)", "pip install -e '.[xds]'")
sys.path.insert(0, str(Path(__file__).parent))

from control_plane import ControlPlane

from metaprotocol_sdk.demo.thrift_server import HelloServer


@pytest.fixture
def servers() -> Iterator[dict[str, HelloServer]]:
    """Subset v1 (``v1a``, ``v1b``) and subset v2 (``v2``) of the hello service."""
    started = {name: HelloServer(name).start() for name in ("v1a", "v1b", "v2")}
    yield started
    for server in started.values():
        server.close()


@pytest.fixture
def control_plane() -> Iterator[ControlPlane]:
    """The test ADS server on an ephemeral port."""
    cp = ControlPlane().start()
    yield cp
    cp.close()
