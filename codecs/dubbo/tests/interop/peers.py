"""Run the Hessian 2.0 reference peers (Caucho hessian.jar on the JVM, hessian.js on node).

Each peer is driven by one process per direction handling every case over stdin/stdout lines,
so the suites stay fast. The Java driver is compiled once per test session into a temporary
directory. A missing peer is a hard failure with a clear message (the project's setup installs
them), never a skip.

Also here: the canonical descriptions the drivers print, predicted from Python values
(:func:`java_describe`, :func:`node_describe`).
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from metaprotocol_dubbo.hessian2 import JavaLong, JavaObject, TypedList, TypedMap

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
JAVA_SRC = HERE / "java" / "HessianDriver.java"
NODE_DRIVER = HERE / "node" / "hessian_driver.js"
HESSIAN_JAR = Path(os.environ.get("HESSIAN_JAR", "/usr/share/java/hessian.jar"))
NODE_MODULES = Path(os.environ.get("NODE_MODULES", REPO / "peers" / "node" / "node_modules"))
#: Short-lived JVMs start faster with the C1 compiler only and the serial collector.
JVM_FAST = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
JAVA_OPENS = [
    "--add-opens",
    "java.base/java.lang=ALL-UNNAMED",
    "--add-opens",
    "java.base/java.util=ALL-UNNAMED",
]
TIMEOUT = 120


class PeerMissing(RuntimeError):
    """A reference peer is not installed; the message says how to install it."""


def _need(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise PeerMissing(f"`{tool}` not found on PATH: {hint}")
    return found


@functools.cache
def java_classpath() -> str:
    """Compile the Java driver (once per process) and return the classpath to run it."""
    javac = _need("javac", "install OpenJDK 17 (apt-get install -y openjdk-17-jdk-headless)")
    if not HESSIAN_JAR.is_file():
        raise PeerMissing(f"{HESSIAN_JAR} missing: apt-get install -y libhessian-java")
    out = tempfile.mkdtemp(prefix="hessian-driver-")
    atexit.register(shutil.rmtree, out, True)
    proc = subprocess.run(
        [
            javac,
            *(f"-J{o}" for o in JVM_FAST),
            "-nowarn",
            "-d",
            out,
            "-cp",
            str(HESSIAN_JAR),
            str(JAVA_SRC),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"javac failed:\n{proc.stderr}")
    return f"{out}{os.pathsep}{HESSIAN_JAR}"


def _run(cmd: list[str], stdin: str = "", env: dict[str, str] | None = None) -> list[str]:
    proc = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [line for line in proc.stdout.split("\n") if line]


def _java(mode: str, stdin: str = "") -> list[str]:
    java = _need("java", "install OpenJDK 17 (apt-get install -y openjdk-17-jdk-headless)")
    cmd = [java, *JVM_FAST, *JAVA_OPENS, "-cp", java_classpath(), "HessianDriver", mode]
    return _run(cmd, stdin)


def _node(mode: str, stdin: str = "", *args: str) -> list[str]:
    node = _need("node", "install node 20")
    if not (NODE_MODULES / "hessian.js").is_dir() or not (NODE_MODULES / "js-to-java").is_dir():
        raise PeerMissing(
            f"hessian.js / js-to-java missing under {NODE_MODULES}: "
            "npm install hessian.js@2.11.0 js-to-java@2.8.0 in peers/node"
        )
    env = {**os.environ, "NODE_MODULES": str(NODE_MODULES)}
    return _run([node, str(NODE_DRIVER), mode, *args], stdin, env)


def _parse_encoded(lines: Iterable[str]) -> dict[str, bytes]:
    out = {}
    for line in lines:
        name, hexdata = line.split("\t")
        out[name] = bytes.fromhex(hexdata)
    return out


@functools.cache
def java_encoded() -> dict[str, bytes]:
    """Every named sample of the Java driver, as Caucho's Hessian2Output writes it."""
    return _parse_encoded(_java("encode"))


@functools.cache
def node_encoded() -> dict[str, bytes]:
    """Every named sample of the node driver, as hessian.js EncoderV2 writes it."""
    return _parse_encoded(_node("encode"))


def _decode_lines(cases: Sequence[tuple[str, int, bytes]]) -> str:
    return "".join(f"{name}\t{count}\t{data.hex()}\n" for name, count, data in cases)


def java_decode(cases: Sequence[tuple[str, int, bytes]]) -> dict[str, tuple[str, str, bytes]]:
    """Decode ``(name, value count, bytes)`` cases with Hessian2Input in one JVM run.

    Returns ``name -> (status, description or error, Java's re-encoding of the values)``.
    """
    out = {}
    for line in _java("decode", _decode_lines(cases)):
        parts = line.split("\t")
        if parts[1] == "OK":
            out[parts[0]] = ("OK", parts[2], bytes.fromhex(parts[3]))
        else:
            out[parts[0]] = ("ERR", parts[2], b"")
    return out


def node_decode(cases: Sequence[tuple[str, int, bytes]]) -> dict[str, tuple[str, str]]:
    """Decode ``(name, value count, bytes)`` cases with hessian.js in one node run."""
    out = {}
    for line in _node("decode", _decode_lines(cases)):
        name, status, desc = line.split("\t")
        out[name] = (status, desc)
    return out


def node_bench(data: bytes, n: int, count: int = 1) -> tuple[float, float]:
    """hessian.js time per operation (microseconds) to decode the ``count`` values in
    ``data`` and to encode them again, as node's own timed loop measures it."""
    (line,) = _node("bench", "", data.hex(), str(n), str(count))
    dec, enc = line.split("\t")
    return float(dec), float(enc)


# -- canonical descriptions -----------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // timedelta(milliseconds=1)


def _units_hex(s: str) -> str:
    return s.encode("utf-16-be", "surrogatepass").hex()


def _double_hex(v: float) -> str:
    return struct.pack(">d", v).hex()


_JAVA_ARRAYS = {
    "[int": "int",
    "[long": "long",
    "[double": "double",
    "[boolean": "boolean",
    "[short": "short",
    "[string": "java.lang.String",
    "[object": "java.lang.Object",
}

#: JavaObject types that are Java enums in the driver.
JAVA_ENUMS = {"HessianDriver$Color"}


def _java_array_item(component: str, v: Any, path: list[Any]) -> str:
    if component in ("int", "short"):
        return f"int:{int(v)}"
    if component == "long":
        return f"long:{int(v)}"
    if component == "double":
        return f"double:{_double_hex(float(v))}"
    return java_describe(v, path)


def java_describe(value: Any, path: list[Any] | None = None) -> str:
    """How the Java driver describes the object Hessian2Input builds for ``value``."""
    if path is None:
        path = []
    v = value
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, JavaLong):
        return f"long:{int(v)}"
    if isinstance(v, int):
        return f"int:{int(v)}" if -(2**31) <= v < 2**31 else f"long:{int(v)}"
    if isinstance(v, float):
        return f"double:{_double_hex(v)}"
    if isinstance(v, str):
        return "str:" + _units_hex(v)
    if isinstance(v, bytes | bytearray):
        return "bin:" + bytes(v).hex()
    if isinstance(v, datetime):
        return f"date:{_ms(v)}"
    for up, p in enumerate(reversed(path), 1):
        if p is v:
            return f"@up{up}"
    path.append(v)
    try:
        if isinstance(v, TypedList) and v.type is not None:
            if v.type.startswith("["):
                comp = _JAVA_ARRAYS.get(v.type, v.type[1:])
                items = [_java_array_item(comp, x, path) for x in v]
                return f"array({comp})[{','.join(items)}]"
            items = [java_describe(x, path) for x in v]
            if v.type.endswith("Set"):
                items.sort()
            return f"list({v.type})[{','.join(items)}]"
        if isinstance(v, list | tuple):
            return f"list(java.util.ArrayList)[{','.join(java_describe(x, path) for x in v)}]"
        if isinstance(v, JavaObject):
            if v.type in JAVA_ENUMS:
                return f"enum({v.type}){v['name']}"
            fields = sorted(f"{k}={java_describe(x, path)}" for k, x in v.items())
            return f"obj({v.type}){{{','.join(fields)}}}"
        if isinstance(v, dict):
            cls = v.type if isinstance(v, TypedMap) and v.type else "java.util.HashMap"
            items = sorted(
                f"{java_describe(k, path)}={java_describe(x, path)}" for k, x in v.items()
            )
            return f"map({cls}){{{','.join(items)}}}"
    finally:
        path.pop()
    raise TypeError(f"no Java description for {type(v).__name__}")


def node_describe(value: Any, path: list[Any] | None = None) -> str:
    """How the node driver describes what hessian.js DecoderV2.read(true) returns."""
    if path is None:
        path = []
    v = value
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if abs(v) > 2**53 - 1:  # hessian.js returns unsafe longs as decimal strings
            return "str:" + _units_hex(str(int(v)))
        return "num:" + _double_hex(float(v))
    if isinstance(v, float):
        if math.isnan(v):
            return "num:" + _double_hex(math.nan)
        return "num:" + _double_hex(v)
    if isinstance(v, str):
        return "str:" + _units_hex(v)
    if isinstance(v, bytes | bytearray):
        return "bin:" + bytes(v).hex()
    if isinstance(v, datetime):
        return f"date:{_ms(v)}"
    for up, p in enumerate(reversed(path), 1):
        if p is v:
            return f"@up{up}"
    path.append(v)
    try:
        if isinstance(v, TypedList) and v.type is not None:
            return f"list({v.type})[{','.join(node_describe(x, path) for x in v)}]"
        if isinstance(v, list | tuple):
            return f"list[{','.join(node_describe(x, path) for x in v)}]"
        if isinstance(v, JavaObject):
            fields = sorted(f"{k}={node_describe(x, path)}" for k, x in v.items())
            return f"obj({v.type}){{{','.join(fields)}}}"
        if isinstance(v, dict):
            cls = v.type if isinstance(v, TypedMap) and v.type else "java.util.HashMap"
            kind = "map" if cls.endswith("Map") else "obj"
            items = sorted(f"{k}={node_describe(x, path)}" for k, x in v.items())
            return f"{kind}({cls}){{{','.join(items)}}}"
    finally:
        path.pop()
    raise TypeError(f"no node description for {type(v).__name__}")
