"""Build the committed seed corpus (``fuzz/corpus/<target>/``) from what real peers wrote.

    .venv/bin/python -m fuzz.seeds

Sources: the codecs' golden vectors (captured from real peers over 127.0.0.1 by the codecs'
``tests/capture_golden.py``), the Dubbo stream captures (``codecs/dubbo/tests/captures``), the
Dubbo and Thrift session captures (``fuzz/captures/{dubbo,thrift}``, written by
:mod:`fuzz.capture_dubbo` and :mod:`fuzz.capture_thrift`),
the Hessian bodies of those Dubbo frames, Hessian values written by Java and hessian.js
(``fuzz/captures/hessian``, written by :mod:`fuzz.capture_hessian`) plus a few streams written
by our encoder (values sharing class definitions and references), and the configuration
examples of the docs, the demo and the config tests. Each seed is named for where it came
from; re-running rewrites the folder, so a seed never drifts from its source.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from metaprotocol_dubbo.hessian2 import JavaLong, JavaObject, TypedList, TypedMap, dumps

from metaprotocol_sdk.demo.configs import demo_yaml, dubbo_service, thrift_service
from metaprotocol_sdk.testing.golden import load_golden

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"
PENDING = Path(__file__).resolve().parent / "pending"
GOLDEN = {
    "dubbo": ROOT / "codecs/dubbo/src/metaprotocol_dubbo/conformance/golden.yaml",
    "thrift": ROOT / "codecs/thrift/src/metaprotocol_thrift/conformance/golden.yaml",
    "kv": ROOT / "metaprotocol_sdk/examples/kv_conformance/golden.yaml",
}
DUBBO_CAPTURES = ROOT / "codecs/dubbo/tests/captures"
THRIFT_CAPTURES = Path(__file__).resolve().parent / "captures" / "thrift"
HESSIAN_CAPTURES = Path(__file__).resolve().parent / "captures" / "hessian"
DUBBO_SESSIONS = Path(__file__).resolve().parent / "captures" / "dubbo"
DUBBO_HEADER = 16

Seed = tuple[str, bytes]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _golden(codec: str) -> Iterator[Seed]:
    frames = []
    for sample in load_golden(GOLDEN[codec]).vectors:
        frames.append(sample.frame)
        yield f"golden-{_slug(sample.name)}", sample.frame
    # Two messages back to back: decode must take the first and then the second.
    for a, b in itertools.pairwise(frames):
        yield "golden-pair", a + b


def _captures(folder: Path) -> Iterator[Seed]:
    """Whole one-direction streams (one frame per line) and each of their frames."""
    for path in sorted(folder.glob("*.hex")):
        frames = [bytes.fromhex(line) for line in path.read_text().split()]
        yield f"capture-{_slug(path.stem)}", b"".join(frames)
        for frame in frames:
            yield f"capture-{_slug(path.stem)}-frame", frame


def _dubbo() -> Iterator[Seed]:
    yield from _golden("dubbo")
    yield from _captures(DUBBO_CAPTURES)
    yield from _captures(DUBBO_SESSIONS)


def _hessian() -> Iterator[Seed]:
    for name, frame in _dubbo():
        if name != "golden-pair" and not name.endswith("-provider-to-consumer"):
            body = frame[DUBBO_HEADER:]
            if body and len(frame) == DUBBO_HEADER + int.from_bytes(frame[12:16], "big"):
                yield f"dubbo-body-{name}", body
    for path in sorted(HESSIAN_CAPTURES.glob("*.tsv")):
        for line in path.read_text().splitlines():
            name, hexed = line.split("\t")
            yield f"{path.stem}-{_slug(name)}", bytes.fromhex(hexed)
    shared = [1, "two"]
    obj = JavaObject("com.example.User", {"name": "ann", "age": 7, "tags": shared})
    values: list[tuple[str, object]] = [
        ("scalars", [None, True, -1, 2**40, 1.5, "é\U0001f600", b"\x00\xff"]),
        ("date", datetime(2026, 1, 2, 3, 4, tzinfo=UTC)),
        ("long", JavaLong(5)),
        ("object-and-refs", [obj, obj, shared, shared]),
        ("typed", [TypedList("[int", [1, 2]), TypedMap("java.util.HashMap", {"k": [1]})]),
        ("map", {1: "a", "b": {"c": [None]}}),
        ("long-string", "x" * 2000),
    ]
    for name, value in values:
        yield f"encoder-{name}", dumps(value)
    # A stream of several values sharing class definitions and references, as a Dubbo body.
    yield "encoder-stream", b"".join(dumps(v) for v in (obj, [obj], {"o": obj}))


def _config() -> Iterator[Seed]:
    yield "demo", demo_yaml([thrift_service({"v1": 9091}), dubbo_service({"v1": 20881})]).encode()
    tree = ast.parse((ROOT / "tests/proxy/test_config.py").read_text())
    for node in ast.walk(tree):
        text = node.value if isinstance(node, ast.Constant) else None
        if isinstance(text, str) and "kind:" in text and "\n" in text:
            yield "test-config", text.encode()
    for path in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S):
            if "kind:" in block:
                yield f"docs-{path.stem}", block.encode()


def seeds() -> dict[str, list[Seed]]:
    """Every target's seeds."""
    thrift = [*_golden("thrift"), *_captures(THRIFT_CAPTURES)]
    return {
        "dubbo": list(_dubbo()),
        "thrift-auto": thrift,
        "thrift-framed": thrift,
        "thrift-unframed": thrift,
        "thrift-header": thrift,
        "kv": list(_golden("kv")),
        "hessian": list(_hessian()),
        "config": list(_config()),
    }


def write(corpus: Path = CORPUS) -> dict[str, int]:
    """Rewrite ``corpus``; returns the number of seeds per target.

    A seed that is also a pending find (``fuzz/pending/<target>/``) is left out: it breaks a
    rule today, and the quick test replays the corpus.
    """
    counts = {}
    for target, items in seeds().items():
        folder = corpus / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        pending = {p.read_bytes() for p in (PENDING / target).glob("*") if p.is_file()}
        unique = {data: name for name, data in reversed(items) if data not in pending}
        for data, name in unique.items():
            digest = hashlib.sha1(data).hexdigest()[:8]
            (folder / f"{name}-{digest}").write_bytes(data)
        counts[target] = len(unique)
    return counts


if __name__ == "__main__":
    for target, count in write().items():
        print(f"{target}: {count} seeds")
