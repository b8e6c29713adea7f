"""Compiled route conditions: each kind, case-insensitive keys, missing and empty values."""

from __future__ import annotations

import re
import time

import pytest
from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, run

from metaprotocol_sdk import Attributes
from metaprotocol_sdk.proxy.config.models import AttributeMatch
from metaprotocol_sdk.proxy.matcher import Matcher, compile_match, compile_regex

ATTRS = Attributes({"Method": "sayHello", "x-tag": "", "version": "v2.1"})


@pytest.mark.parametrize(
    ("kind", "attribute", "value", "expected"),
    [
        ("exact", "method", "sayHello", True),
        ("exact", "METHOD", "sayHello", True),  # keys ignore case
        ("exact", "method", "sayhello", False),  # values do not
        ("exact", "missing", "", False),  # absent is not the empty string
        ("exact", "x-tag", "", True),
        ("prefix", "version", "v2", True),
        ("prefix", "version", "v3", False),
        ("prefix", "missing", "", False),
        ("prefix", "x-tag", "", True),
        ("regex", "version", r"v\d\.\d", True),
        ("regex", "version", r"v\d", False),  # a full match, as Istio's regex
        ("regex", "missing", ".*", False),
        ("present", "x-tag", "", True),  # present even when empty
        ("present", "Version", "", True),
        ("present", "missing", "", False),
    ],
)
def test_each_condition_kind(kind: str, attribute: str, value: str, expected: bool) -> None:
    match = compile_match([AttributeMatch(attribute, kind, value)])  # type: ignore[arg-type]
    assert match(ATTRS) is expected


def test_conditions_combine_with_and() -> None:
    both = compile_match(
        [AttributeMatch("method", "exact", "sayHello"), AttributeMatch("version", "prefix", "v2")]
    )
    assert both(ATTRS)
    assert not both(Attributes({"method": "sayHello", "version": "v1"}))
    assert compile_match([])(Attributes())  # no conditions match everything


#: The issue's pattern: with a backtracking engine, ``a`` x 27 + ``!`` took seconds.
HOSTILE_PATTERN = r"([a-z0-9]+-?)*[a-z0-9]+\.prod"


def _cost(match: Matcher, value: str, rounds: int = 20) -> float:
    attrs = Attributes({"host": value})
    start = time.perf_counter()
    for _ in range(rounds):
        assert not match(attrs)
    return time.perf_counter() - start


def test_regex_is_linear_on_a_backtracking_bomb() -> None:
    match = compile_match([AttributeMatch("host", "regex", HOSTILE_PATTERN)])
    assert match(Attributes({"host": "api-v2.prod"}))
    # Backtracking doubles the time with each byte (28 bytes took 8 s with Python's re):
    # 4 bytes more must not cost 16x. Best of 3 against the machine's noise.
    short, longer = (min(_cost(match, "a" * n + "!") for _ in range(3)) for n in (15, 19))
    assert longer < 2.5 * short + 1e-3, (short, longer)
    assert _cost(match, "a" * 27 + "!", rounds=1) < 0.5
    # The 28 bytes, then 2x and 4x: each doubling at most about doubles the time.
    t28, t56, t112 = (
        min(_cost(match, "a" * (n - 1) + "!") for _ in range(3)) for n in (28, 56, 112)
    )
    assert t56 < 2.5 * t28 + 1e-3 and t112 < 2.5 * t56 + 1e-3, (t28, t56, t112)
    # Linear: doubling the input at most about doubles the time.
    base, double, quadruple = (
        min(_cost(match, "a" * n + "!") for _ in range(3)) for n in (2000, 4000, 8000)
    )
    assert double < 2.5 * base + 1e-3, (base, double)
    assert quadruple < 2.5 * double + 1e-3, (double, quadruple)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("say(Hello", "missing )"),
        (r"(?<=a)b", "invalid perl operator"),  # no look-behind in RE2 (nor in Istio)
        (r"(a)\1", "invalid escape sequence"),  # no back-references
        ("[a-z]{1,64}", "program size 131 is above the limit of 100"),
    ],
)
def test_patterns_re2_refuses(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        compile_regex(pattern)


def test_re2_syntax_istio_accepts() -> None:
    assert compile_regex(r"\p{Greek}+")("αβγ")
    assert compile_regex(r"(?i)sayhello")("SayHello")
    assert compile_regex(r"é+")("éé")  # UTF-8, not bytes
    assert not compile_regex(r"a.c")("a\nc")  # "." does not match a newline, as in Go


def test_a_hostile_attribute_through_the_engine_costs_linear_time() -> None:
    """Over a real socket: the client picks the attribute, the engine must not stall on it."""
    router = f"""\
    - name: prod
      match: {{attributes: {{host: {{regex: '{HOSTILE_PATTERN}'}}}}}}
      route: [{{destination: {{host: svc.test, subset: v1}}}}]
    """

    async def main() -> None:
        up = await Upstream("a").start()
        async with engine_for(mesh([(up.port, "v1")], router=router)) as engine:
            client = await Client.connect(address(engine))
            assert error_type(await client.call(headers={"host": "api-v2.prod"})) is None

            async def cost(n: int) -> float:
                start = time.perf_counter()
                for _ in range(10):
                    reply = await client.call(headers={"host": "a" * n + "!"})
                    assert error_type(reply) == "RouteNotFound"
                return time.perf_counter() - start

            # Backtracking: 4 bytes more cost 16x (28 bytes stalled every client for 8 s).
            short = min([await cost(15) for _ in range(3)])
            longer = min([await cost(19) for _ in range(3)])
            assert longer < 2.5 * short + 5e-3, (short, longer)
            await cost(27)  # the 28 bytes: each call within the 5 s wait
            base = min([await cost(4000) for _ in range(3)])
            double = min([await cost(8000) for _ in range(3)])
            assert double < 2.5 * base + 5e-3, (base, double)
            client.close()
            await client.closed
        await up.close()

    run(main())
