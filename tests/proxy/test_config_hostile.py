"""Hostile configuration input: every problem is a ConfigError naming the file, never a crash."""

from __future__ import annotations

import pytest
from proxy_kit import mesh

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.proxy import loads_config


def _router(pattern: str) -> str:
    return mesh(
        [(1, "v1")],
        router=f"""\
        - name: ok
          match: {{attributes: {{method: {{exact: get}}}}}}
          route: [{{destination: {{host: svc.test}}}}]
        - name: bad
          match: {{attributes: {{host: {{regex: '{pattern}'}}}}}}
          route: [{{destination: {{host: svc.test}}}}]
        """,
    )


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(?<=a)b", "RE2 refuses it: invalid perl operator: (?<="),
        (r"(a)\1", "RE2 refuses it: invalid escape sequence"),
        ("[a-z]{1,64}", "program size 131 is above the limit of 100"),
    ],
)
def test_a_regex_re2_refuses_names_its_field(pattern: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(_router(pattern), "mesh.yaml")
    assert info.value.field == "spec.routes[1].match.attributes.host.regex"
    assert info.value.source is not None and "MetaRouter/svc" in info.value.source
    assert reason in info.value.reason


def test_istio_regex_syntax_loads() -> None:
    loads_config(_router(r"([a-z0-9]+-?)*[a-z0-9]+\.prod"))
