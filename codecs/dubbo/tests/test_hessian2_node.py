"""Interop with hessian.js 2.11.0 (+ js-to-java 2.8.0) on node, both directions, one run each.

* hessian.js -> us: every sample the node driver writes decodes to the expected value, and
  our encoding of that value is byte-identical to hessian.js's (where it is deterministic).
* us -> hessian.js: what we write, DecoderV2 reads to the values we predict.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from interop import peers
from metaprotocol_dubbo.hessian2 import (
    Decoder,
    Encoder,
    JavaInt,
    JavaLong,
    JavaObject,
    TypedList,
    TypedMap,
)


def utc(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def pattern(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


def person(name: str, age: int, pid: int) -> JavaObject:
    return JavaObject("com.example.Person", {"name": name, "age": age, "id": JavaLong(pid)})


def node_samples() -> dict[str, list[Any]]:
    """The values behind every node sample name."""
    s: dict[str, list[Any]] = {"null": [None], "true": [True], "false": [False]}
    for v in (0, 1, -1, -16, 47, 48, -17, -2048, 2047, 2048, -2049, -262144, 262143, 262144,
              -262145, 2**31 - 1, -(2**31)):  # fmt: skip
        s[f"int_{v}"] = [JavaInt(v)]
    for v in (0, -8, 15, 16, -9, -2048, 2047, 2048, -2049, -262144, 262143, 262144, -262145,
              2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**53 - 1):  # fmt: skip
        s[f"long_{v}"] = [JavaLong(v)]
    doubles = {
        "0": 0.0, "1": 1.0, "-1": -1.0, "127": 127.0, "-128": -128.0, "128": 128.0,
        "32767": 32767.0, "32768": 32768.0, "1.5": 1.5, "0.1": 0.1, "12.25": 12.25,
        "3.14159": 3.14159, "2147483.647": 2147483.647, "10000000000": 1e10, "1e+300": 1e300,
        "NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf,
    }  # fmt: skip
    for k, v in doubles.items():
        s[f"double_{k}"] = [v]
    s["number_int"] = [42]
    s["number_frac"] = [2.75]
    s["str_empty"] = [""]
    s["str_a"] = ["a"]
    s["str_32"] = ["c" * 32]
    s["str_1024"] = ["e" * 1024]
    s["str_32769"] = ["g" * 0x8001]
    s["str_latin"] = ["héllo wörld"]
    s["str_cjk"] = ["中文字符"]
    s["str_emoji"] = ["a\U0001f600b"]
    s["str_mixed_40"] = ["é中\U0001f600x" * 8]
    for n in (0, 15, 16, 1024):
        s[f"bin_{n}"] = [pattern(n)]
    s["date_0"] = [utc(0)]
    s["date_ms"] = [utc(1600000000123)]
    s["date_minute"] = [utc(1600000020000)]
    s["list_empty"] = [[]]
    s["list_3"] = [[1, "two", 3.5]]
    s["list_8"] = [list(range(8))]
    s["array_int"] = [TypedList("[int", [1, 2, 3])]
    s["array_string"] = [TypedList("[java.lang.String", ["a", "b"])]
    s["java_list"] = [TypedList("java.util.List", [1, 2])]
    s["map_plain"] = [{"a": 1, "b": "x"}]
    s["hashmap"] = [{"k": "v"}]
    s["object"] = [person("ann", 30, 7)]
    s["objects_two"] = [[person("a", 1, 1), person("b", 2, 2)]]
    s["enum"] = [JavaObject("com.example.Color", {"name": "RED"})]
    s["stream_dubbo_like"] = [
        "2.0.2", "com.example.Svc", "1.0.0", "sayHello", "Lcom/example/Person;",
        person("a", 1, 1), {"path": "com.example.Svc", "timeout": "3000"},
    ]  # fmt: skip
    return s


# hessian.js bytes that differ from ours (and from Java's) by design:
NOT_IDENTICAL = {
    # hessian.js writes a whole Date in the 64-bit form; Java and we use 0x4b for whole minutes
    "date_minute": "hessian.js never writes the 0x4b minute form",
    "date_0": "hessian.js never writes the 0x4b minute form",
}

SAMPLES = node_samples()


def decode_all(data: bytes, count: int) -> list[Any]:
    d = Decoder(data)
    values = [d.read() for _ in range(count)]
    assert d.at_end
    return values


def encode_all(values: list[Any]) -> bytes:
    e = Encoder()
    for v in values:
        e.write(v)
    return e.getvalue()


@pytest.fixture(scope="module")
def node_bytes() -> dict[str, bytes]:
    try:
        return peers.node_encoded()  # type: ignore[no-any-return]
    except peers.PeerMissing as exc:
        pytest.fail(f"hessian.js peer missing: {exc}")


def test_every_node_sample_has_an_expectation(node_bytes: dict[str, bytes]) -> None:
    assert set(node_bytes) == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_node_output_decodes_to_the_expected_value(node_bytes: dict[str, bytes], name: str) -> None:
    expected = SAMPLES[name]
    got = decode_all(node_bytes[name], len(expected))
    for g, e in zip(got, expected, strict=True):
        if isinstance(e, float) and math.isnan(e):
            assert isinstance(g, float) and math.isnan(g)
        else:
            assert g == e
            assert type(g) is type(e) or isinstance(e, JavaInt | JavaLong)


@pytest.mark.parametrize("name", sorted(set(SAMPLES) - set(NOT_IDENTICAL)))
def test_our_encoding_is_byte_identical_to_hessian_js(
    node_bytes: dict[str, bytes], name: str
) -> None:
    assert encode_all(SAMPLES[name]).hex() == node_bytes[name].hex()


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["none", "bool", "int", "long", "float", "str", "bytes", "date"]
    if depth < 3:
        kinds += ["list", "dict", "typedlist", "object", "treemap"]
    kind = rng.choice(kinds)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-(2 ** rng.choice([4, 11, 18, 31])), 2**31 - 1)
    if kind == "long":
        return JavaLong(rng.randint(-(2**63), 2**63 - 1) >> rng.choice([0, 10, 40, 60]))
    if kind == "float":
        return rng.choice([rng.uniform(-1e9, 1e9), rng.randint(-9999, 9999) / 100, -0.0, 0.5])
    if kind == "str":
        alphabet = rng.choice(["abc", "héllo", "中文", "\U0001f600x"])
        return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 5, 33, 1030])))
    if kind == "bytes":
        return rng.randbytes(rng.choice([0, 7, 20, 2000]))
    if kind == "date":
        return utc(rng.randint(-(10**12), 10**13))
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.choice([0, 3, 9]))]
    if kind == "dict":
        return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.choice([0, 2, 5]))}
    if kind == "typedlist":
        return TypedList("[int", [rng.randint(-1000, 1000) for _ in range(rng.randint(0, 10))])
    if kind == "treemap":
        return TypedMap("java.util.TreeMap", {"a": random_value(rng, depth + 1)})
    return JavaObject(
        "com.example.Thing",
        {"name": random_value(rng, depth + 1), "value": random_value(rng, depth + 1)},
    )


def python_cases() -> dict[str, list[Any]]:
    cases = {f"node:{k}": v for k, v in SAMPLES.items()}
    shared = [1, 2]
    cases.update(
        {
            "py:int_keys": [{1: "a", 2: "b"}],
            "py:shared_ref": [[shared, shared]],
            "py:long_chunked_string": ["x\U0001f600" * 20000],
            "py:chunked_binary": [pattern(0x8000 * 2 + 1)],
            "py:17_classes": [[JavaObject(f"com.example.K{i}", {"v": i}) for i in range(17)] * 2],
            "py:minus_zero": [-0.0],
            "py:big_long": [2**62],
        }
    )
    rng = random.Random(4242)
    for i in range(100):
        cases[f"rand:{i}"] = [random_value(rng)]
    return cases


PY_CASES = python_cases()


@pytest.fixture(scope="module")
def node_reads() -> dict[str, tuple[str, str]]:
    cases = [(name, len(values), encode_all(values)) for name, values in PY_CASES.items()]
    try:
        return peers.node_decode(cases)  # type: ignore[no-any-return]
    except peers.PeerMissing as exc:
        pytest.fail(f"hessian.js peer missing: {exc}")


@pytest.mark.parametrize("name", sorted(PY_CASES))
def test_hessian_js_reads_what_we_write(node_reads: dict[str, tuple[str, str]], name: str) -> None:
    status, desc = node_reads[name]
    assert status == "OK", desc
    assert desc == "|".join(peers.node_describe(v) for v in PY_CASES[name])


def test_hessian_js_cannot_read_variable_length_lists() -> None:
    """A gap in hessian.js 2.11.0 (Java reads both): 'U' and 'W' lists are unknown codes.

    Nothing we write by default uses them (lists are fixed-length, as Java writes them); only
    ``TypedList(..., variable=True)`` asks for them.
    """
    w = encode_all([TypedList(None, [1, 2], variable=True)])
    u = encode_all([TypedList("[int", [3], variable=True)])
    assert w == bytes.fromhex("5791925a")
    assert u == bytes.fromhex("55045b696e74935a")
    got = peers.node_decode([("w", 1, w), ("u", 1, u)])
    assert got["w"][0] == "ERR" and "0x57" in got["w"][1]
    assert got["u"][0] == "ERR" and "0x55" in got["u"][1]
