"""Fixtures for the Dubbo codec tests: real peers started once per session, and a relay."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dubbo_harness import (
    LineProcess,
    PeerMissing,
    Relay,
    start_node_consumer,
    start_node_provider,
    start_python_consumer,
)


def _start(factory, *args):  # type: ignore[no-untyped-def]
    try:
        return factory(*args)
    except PeerMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def provider() -> Iterator[tuple[LineProcess, int]]:
    """The sofa-rpc-node provider and its port."""
    proc, port = _start(start_node_provider)
    yield proc, port
    proc.close()


@pytest.fixture(scope="session")
def session_relay(provider: tuple[LineProcess, int]) -> Iterator[Relay]:
    """One relay (our codec) in front of the provider, shared by the session."""
    relay = Relay(provider[1])
    yield relay
    relay.close()


@pytest.fixture
def relay(session_relay: Relay) -> Iterator[Relay]:
    """The shared relay, reset to plain forwarding with an empty history."""
    session_relay.reset()
    yield session_relay
    session_relay.reset()


@pytest.fixture(scope="session")
def node_consumer(session_relay: Relay) -> Iterator[LineProcess]:
    """The sofa-rpc-node consumer, connected through the relay."""
    proc = _start(start_node_consumer, session_relay.port)
    yield proc
    proc.close()


@pytest.fixture(scope="session")
def python_consumer(session_relay: Relay) -> Iterator[LineProcess]:
    """The dubbo-ssl-python consumer, connected through the relay."""
    proc = _start(start_python_consumer, session_relay.port)
    yield proc
    proc.close()
