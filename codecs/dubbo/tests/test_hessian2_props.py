"""Property-based tests: round trips over nested values, exact skips, streams, and fuzzing."""

from __future__ import annotations

import contextlib
import encodings
import re
import sys
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from metaprotocol_dubbo.hessian2 import (
    Decoder,
    Encoder,
    HessianError,
    JavaLong,
    JavaObject,
    TypedList,
    TypedMap,
    dumps,
    loads,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

datetimes = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1).map(JavaLong),
    st.integers(-300000, 300000),
    st.floats(allow_nan=False),
    st.text(),
    st.text(alphabet="abcé中\U0001f600", min_size=28, max_size=40),
    st.binary(max_size=40),
    datetimes,
)
keys = st.one_of(st.text(max_size=6), st.integers(-1000, 1000))
type_names = st.sampled_from(["[int", "[object", "java.util.HashSet", "com.x.Y"])
class_names = st.sampled_from(["com.x.A", "com.x.B", "C"])
field_names = st.text(alphabet="abcdefgh", min_size=1, max_size=4)

# pytest's importlib mode can register this repository's codecs/ folder as the module
# "codecs", which breaks encodings loaded later (unicode_escape for test ids); put the
# standard library module back (see interop/peers.py).
sys.modules["codecs"] = encodings.codecs


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=10),
        st.dictionaries(keys, children, max_size=5),
        st.builds(
            lambda t, items, var: TypedList(t, items, variable=var),
            type_names,
            st.lists(children, max_size=9),
            st.booleans(),
        ),
        st.builds(
            TypedMap,
            st.sampled_from(["java.util.TreeMap", "x.M"]),
            st.dictionaries(keys, children, max_size=4),
        ),
        st.builds(JavaObject, class_names, st.dictionaries(field_names, children, max_size=4)),
    )


values = st.recursive(scalars, _containers, max_leaves=25)


@SETTINGS
@given(values)
def test_round_trip(value: Any) -> None:
    assert loads(dumps(value)) == value


@SETTINGS
@given(values)
def test_skip_consumes_exactly_the_value(value: Any) -> None:
    data = dumps(value) + b"\x90"
    d = Decoder(data)
    d.skip()
    assert d.offset == len(data) - 1
    assert d.read() == 0


@SETTINGS
@given(values)
def test_reencoding_what_we_read_gives_the_same_bytes(value: Any) -> None:
    data = dumps(value)
    assert dumps(Decoder(data, java_longs=True).read()) == data


@SETTINGS
@given(st.lists(values, min_size=1, max_size=6), st.lists(st.booleans(), min_size=12, max_size=12))
def test_streams_read_and_skip_in_any_mix(vals: list[Any], mask: list[bool]) -> None:
    # repeat the containers: the second writes are references across top-level values
    stream = vals + [v for v in vals if isinstance(v, list | dict)]
    e = Encoder()
    for v in stream:
        e.write(v)
    data = e.getvalue()
    d = Decoder(data)
    for v, read in zip(stream, mask + [True] * len(stream), strict=False):
        if read:
            assert d.read() == v
        else:
            d.skip()
    assert d.at_end


def _no_split_pairs(s: str) -> bool:
    return re.search("[\ud800-\udbff][\udc00-\udfff]", s) is None


@SETTINGS
@given(st.text(st.characters(blacklist_categories=())).filter(_no_split_pairs))
def test_strings_with_any_code_points_round_trip(s: str) -> None:
    data = dumps(s)
    units = len(s.encode("utf-16-le", "surrogatepass")) // 2
    if units <= 31:
        assert data[0] == units  # the length counts UTF-16 units
    assert loads(data) == s
    d = Decoder(data)
    assert d.read_string() == s and d.at_end


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=60))
def test_random_bytes_raise_only_hessian_errors(data: bytes) -> None:
    for op in ("read", "skip"):
        d = Decoder(data, max_depth=20)
        try:
            getattr(d, op)()
        except HessianError as exc:
            assert exc.offset is not None and 0 <= exc.offset <= len(data)
        else:
            assert 0 < d.offset <= len(data)


@settings(max_examples=300, deadline=None)
@given(values, st.data())
def test_corrupted_encodings_raise_only_hessian_errors(value: Any, data: st.DataObject) -> None:
    raw = bytearray(dumps(value))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for op in ("read", "skip"):
        d = Decoder(bytes(raw[:cut]))
        with contextlib.suppress(HessianError):
            getattr(d, op)()
