"""Make the test control plane and snapshots importable (pytest runs in importlib mode).

These tests need the ``xds`` extra (grpcio, xds-protos); without it they are skipped.
"""

import sys
from pathlib import Path

import pytest

pytest.importorskip("envoy.service.discovery.v3.ads_pb2_grpc", reason="needs the xds extra")
sys.path.insert(0, str(Path(__file__).parent))
