"""Shared pieces of the Dubbo end-to-end tests: the sofa-rpc-node consumer driven over
JSON lines, and MetaRouter YAML builders."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from metaprotocol_sdk.demo.procs import node_child

INTERFACE = "org.apache.dubbo.samples.basic.api.DemoService"


def dest(svc: tuple[str, int], subset: str | None = None, weight: int | None = None) -> str:
    sub = f", subset: {subset}" if subset else ""
    line = f"\n        - destination: {{host: {svc[0]}, port: {{number: {svc[1]}}}{sub}}}"
    return line + (f"\n          weight: {weight}" if weight is not None else "")


def route(name: str, dests: str, match: str = "", extra: str = "") -> str:
    when = f"\n      match: {{attributes: {{{match}}}}}" if match else ""
    return f"\n    - name: {name}{when}{extra}\n      route:{dests}"


def router(name: str, svc: tuple[str, int], routes: str) -> str:
    return f"""
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: MetaRouter
metadata: {{name: {name}}}
spec:
  hosts: [{svc[0]}]
  routes:{routes}
---"""


class Consumer:
    """The sofa-rpc-node consumer (``dubbo_peer.js consumer``): one call per JSON line."""

    _ids = itertools.count(1)

    def __init__(self, port: int, *, wait: bool = True) -> None:
        self.child = node_child("dubbo-consumer", "consumer", f"127.0.0.1:{port}")
        if wait:
            self.child.wait_ready()

    def send(self, method: str, args: list[Any] | None = None, **props: str) -> int:
        call_id = next(self._ids)
        msg = {"id": call_id, "method": method, "args": args or [], "props": props}
        self.child.send(json.dumps(msg | {"timeout": 5000}))
        return call_id

    def results(self, ids: list[int], timeout: float = 15) -> dict[int, dict[str, Any]]:
        """Replies for ``ids`` (they may arrive in any order)."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(ids):
            reply = json.loads(self.child.readline(max(0.1, deadline - time.monotonic())))
            got[reply["id"]] = reply
        return got

    def call(self, method: str, args: list[Any] | None = None, **props: str) -> dict[str, Any]:
        call_id = self.send(method, args, **props)
        return self.results([call_id])[call_id]


def version_of(reply: dict[str, Any]) -> str:
    assert reply["ok"], reply
    return str(reply["result"]).split(":", 1)[0]
