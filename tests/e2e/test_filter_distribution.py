"""A user's filter installed as its own distribution (``tests/e2e/filter_dist``) and loaded by
its entry point, by its Aeraki-style name and by its alias, with real peers: an Apache Thrift
THeader server and a sofa-rpc-node Dubbo provider see the key it adds; dubbo-ssl-python and
Apache Thrift clients send the traffic."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from metaprotocol_sdk.demo.procs import Child, node_child
from metaprotocol_sdk.registry import available_filters, resolve_filter

DIST = Path(__file__).with_name("filter_dist")
AERAKI_NAME, ALIAS = "aeraki.meta_protocol.filters.e2e_mark", "e2e-mark"
BY_NAME, BY_ALIAS, DUBBO = (
    ("byname.thrift.dist", 9290),
    ("byalias.thrift.dist", 9291),
    ("demoservice.dubbo.dist", 20980),
)
INTERFACE = "org.apache.dubbo.samples.basic.api.DemoService"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``pip install --no-deps --target`` of the filter's distribution, put on ``sys.path``
    (``importlib.metadata`` then finds its entry points there)."""
    assert not any(ALIAS in info.names for info in available_filters()), "already installed"
    work = tmp_path_factory.mktemp("filter-dist")
    source, target = work / "src", work / "site"
    # Build from a copy: setuptools leaves build/ and *.egg-info next to its sources.
    shutil.copytree(DIST, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"pip install of {DIST} failed:\n{proc.stderr}"
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m.split(".")[0] == "e2e_mark_filter"]:
            del sys.modules[name]
        importlib.invalidate_caches()


def test_found_by_entry_point(installed: Path) -> None:
    by_name, by_alias = resolve_filter(AERAKI_NAME), resolve_filter(ALIAS)
    assert by_name == by_alias
    assert by_name.target == "e2e_mark_filter:MarkFilter"
    assert by_name.distribution.replace("_", "-") == "e2e-mark-filter"
    cls = by_name.load()
    assert cls.__name__ == "MarkFilter"
    assert Path(str(sys.modules[cls.__module__].__file__)).is_relative_to(installed)


def router(svc: tuple[str, int]) -> str:
    return f"""
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: {svc[0].split(".")[0]}}}
spec:
  hosts: [{svc[0]}]
  routes:
    - name: all
      route: [{{destination: {{host: {svc[0]}, port: {{number: {svc[1]}}}}}}}]
---"""


def listener(svc: tuple[str, int], name: str, mark: str) -> str:
    return f"""
    - host: {svc[0]}
      port: {svc[1]}
      bind: "127.0.0.1:0"
      filters:
        - name: {name}
          config: {{mark: {mark}}}"""


class Peers:
    """Two THeader servers, a Dubbo provider, and the engine with the filter on each listener."""

    def __init__(self, harness: ModuleType, apache: ModuleType, start_engine: Any) -> None:
        self.apache = apache
        self.h1 = harness.ApacheHeaderServer(apache, "h1")
        self.h2 = harness.ApacheHeaderServer(apache, "h2")
        self.provider: Child = node_child("provider-dist", "provider", "v1")
        svc = harness.service_yaml
        yaml = "".join(
            [
                harness.application_protocol_yaml("thrift"),
                harness.application_protocol_yaml("dubbo"),
                svc("byname", "thrift", *BY_NAME, {"v1": self.h1.port}),
                svc("byalias", "thrift", *BY_ALIAS, {"v1": self.h2.port}),
                svc("dubbo", "dubbo", *DUBBO, {"v1": self.provider.wait_ready()}),
                router(BY_NAME),
                router(BY_ALIAS),
                router(DUBBO),
                f"""
apiVersion: proxy.metaprotocol.io/v1alpha1
kind: ProxyConfig
metadata: {{name: e2e}}
spec:
  listeners:{listener(BY_NAME, AERAKI_NAME, "by-name")}{listener(BY_ALIAS, ALIAS, "by-alias")}{
                    listener(DUBBO, ALIAS, "dubbo")
                }
  admin: {{bind: "127.0.0.1:0"}}
  timeouts: {{connect: 1s, route: 5s, drain: 1s}}
""",
            ]
        )
        self.engine = start_engine(yaml)

    def header_client(self, svc: tuple[str, int]) -> tuple[Any, Any]:
        """An Apache Thrift THeader client and its transport."""
        from thrift.protocol.THeaderProtocol import THeaderProtocol
        from thrift.transport.THeaderTransport import THeaderClientType
        from thrift.transport.TSocket import TSocket

        sock = TSocket("127.0.0.1", self.engine.port(*svc))
        sock.setTimeout(5000)
        proto = THeaderProtocol(sock, allowed_client_types=(THeaderClientType.HEADERS,))
        proto.trans.open()
        return self.apache.Client(proto), proto.trans

    def close(self) -> None:
        self.h1.close()
        self.h2.close()
        self.provider.stop()


@pytest.fixture(scope="module")
def peers(
    installed: Path, harness: ModuleType, apache_hello: ModuleType, start_engine: Any
) -> Iterator[Peers]:
    p = Peers(harness, apache_hello, start_engine)
    yield p
    p.close()


def mark_filters() -> dict[str, Any]:
    """The filter instances the engine built, by their configured mark."""
    return {f.mark: f for f in sys.modules["e2e_mark_filter"].MarkFilter.instances}


@pytest.mark.parametrize(("svc", "mark"), [(BY_NAME, "by-name"), (BY_ALIAS, "by-alias")])
def test_theader_server_sees_the_filters_key(peers: Peers, svc: tuple[str, int], mark: str) -> None:
    client, trans = peers.header_client(svc)
    try:
        seen = [json.loads(client.headers()) for _ in range(5)]
    finally:
        trans.close()
    assert [s.get("x-e2e-mark") for s in seen] == [mark] * 5
    assert mark_filters()[mark].requests == 5  # the filter counted the requests it saw
    dump = peers.engine.loop_call(peers.engine.engine.config_dump)
    (shown,) = [lst for lst in dump["listeners"] if lst["name"].startswith(svc[0])]
    assert shown["routes"][0]["chain"] == ["e2e_mark"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dubbo_provider_sees_the_filters_key(peers: Peers) -> None:
    from dubbo_ssl.client import DubboClient

    client = DubboClient(
        INTERFACE, group="", version="1.0.0", host=f"127.0.0.1:{peers.engine.port(*DUBBO)}"
    )
    logging.disable(logging.CRITICAL)  # the library logs every exception it reports
    try:
        seen = [json.loads(client.call("attachments", [], timeout=5)) for _ in range(3)]
    finally:
        logging.disable(logging.NOTSET)
    assert [s["props"].get("x-e2e-mark") for s in seen] == ["dubbo"] * 3
    assert mark_filters()["dubbo"].requests == 3
