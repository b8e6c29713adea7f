"""A stream and a request go through ``metaprotocol proxy``, configured by ``deploy/``, from the
example client to the example server: what README.md runs by hand."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import yaml

from {{ cookiecutter.package_name }}.example_client import (
    Reply,
    exchange,
    stream_exchange,
    stream_frames,
)
from {{ cookiecutter.package_name }}.example_server import SERVED_BY, serve
from {{ cookiecutter.package_name }}.protocol import Kind, build_frame

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
LISTENING = re.compile(rb"listening \S+ on (127\.0\.0\.1):(\d+)$")
T = TypeVar("T")


def deploy_files(where: Path, server_port: int) -> list[Path]:
    """``deploy/mesh.yaml`` and ``deploy/proxy.yaml`` with only the addresses changed: the
    engine binds free ports and the ServiceEntry's endpoint is the example server."""
    mesh = list(yaml.safe_load_all((DEPLOY / "mesh.yaml").read_text("utf-8")))
    for doc in mesh:
        if doc["kind"] == "ServiceEntry":
            for endpoint in doc["spec"]["endpoints"]:
                endpoint["ports"] = {name: server_port for name in endpoint["ports"]}
    settings = yaml.safe_load((DEPLOY / "proxy.yaml").read_text("utf-8"))
    for listener in settings["spec"]["listeners"]:
        listener["bind"] = "127.0.0.1:0"
    settings["spec"]["admin"]["bind"] = "127.0.0.1:0"
    (where / "mesh.yaml").write_text(yaml.safe_dump_all(mesh), "utf-8")
    (where / "proxy.yaml").write_text(yaml.safe_dump(settings), "utf-8")
    return [where / "mesh.yaml", where / "proxy.yaml"]


def through_proxy(where: Path, client: Callable[[str, int], Awaitable[T]]) -> T:
    """Run ``client(host, port)`` against ``metaprotocol proxy``'s listener, in front of the
    example server."""

    async def scenario() -> T:
        server = await serve("127.0.0.1", 0)
        configs = deploy_files(where, server.sockets[0].getsockname()[1])
        command = [sys.executable, "-m", "metaprotocol_sdk", "proxy"]
        for config in configs:
            command += ["-c", str(config)]
        async with server:
            engine = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            try:
                assert engine.stdout is not None
                printed = []
                async with asyncio.timeout(30):
                    while not (found := LISTENING.match(line := await engine.stdout.readline())):
                        printed.append(line.decode(errors="replace"))
                        assert line, f"metaprotocol proxy exited:\n{''.join(printed)}"
                return await client(found[1].decode(), int(found[2]))
            finally:
                if engine.returncode is None:
                    engine.terminate()
                await engine.wait()

    return asyncio.run(scenario())


def test_a_stream_goes_through_the_proxy(tmp_path: Path) -> None:
    frames = stream_frames(1, {"method": "sayHello", "tenant": "blue"}, [b"one", b"two"])
    replies: list[Reply] = through_proxy(
        tmp_path, lambda host, port: stream_exchange(host, port, frames, 1)
    )
    assert [r.metadata.message_type.name for r in replies] == [
        "Stream_Data",
        "Stream_Data",
        "Stream_Data",
        "Stream_Close_One_Way",
    ]
    assert all(r.ok and r.metadata.stream_id == 1 for r in replies)
    # The server echoed the open: it was routed by its key-values, with the route's mutation.
    opened = replies[0].metadata.attributes
    assert opened["x-routed-by"] == "metaprotocol-engine"
    assert opened["tenant"] == "blue"
    assert opened["served-by"] == SERVED_BY
    assert [bytes(r.metadata.body) for r in replies[1:3]] == [b"one", b"two"]


def test_a_request_goes_through_the_proxy(tmp_path: Path) -> None:
    frame = build_frame(Kind.REQUEST, 1, {"method": "sayHello"}, b"hi")
    (reply,) = through_proxy(tmp_path, lambda host, port: exchange(host, port, [frame], 1))
    assert reply.ok
    assert reply.metadata.attributes["x-routed-by"] == "metaprotocol-engine"
    assert reply.metadata.attributes["x-route"] == "say-hello"
    assert bytes(reply.metadata.body) == b"hi"
