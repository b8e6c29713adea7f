"""The filter, driven by the SDK's filter harness (no sockets, no engine)."""

from __future__ import annotations

import pytest
from metaprotocol_sdk.enums import ErrorType
from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.testing import FilterHarness, check_filter

from {{ cookiecutter.package_name }} import {{ cookiecutter.__filter_class }}


def test_request_with_the_attribute_goes_on_marked() -> None:
    with FilterHarness({{ cookiecutter.__filter_class }}.from_config({})) as harness:
        outcome = harness.request({"method": "sayHello", "Tenant": "blue"})
    assert outcome.continued
    assert outcome.mutation == {"x-checked-tenant": "blue"}


def test_request_without_the_attribute_is_answered_bad_request() -> None:
    with FilterHarness({{ cookiecutter.__filter_class }}.from_config({})) as harness:
        missing = harness.request({"method": "sayHello"})
        empty = harness.request({"method": "sayHello", "tenant": ""})
    for outcome in (missing, empty):
        assert outcome.error is ErrorType.BadRequest
        assert outcome.message == "missing attribute 'tenant'"
        assert outcome.mutation == {}


def test_allowed_values_and_mark_are_configurable() -> None:
    config = {"attribute": "x-user", "allowed": ["ann", "bob"], "mark": "x-caller"}
    with FilterHarness({{ cookiecutter.__filter_class }}.from_config(config)) as harness:
        assert harness.request({"x-user": "ann"}).mutation == {"x-caller": "ann"}
        refused = harness.request({"x-user": "eve"})
    assert refused.error is ErrorType.BadRequest
    assert refused.message == "x-user 'eve' is not allowed"


@pytest.mark.parametrize(
    "config",
    [{"attribute": ""}, {"allowed": "blue"}, {"allowed": [1]}, {"mark": 7}, {"tenant": "x"}],
)
def test_bad_settings_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        {{ cookiecutter.__filter_class }}.from_config(config)


def test_filter_contract() -> None:
    """What every filter owes the engine: unknown settings refused, nothing raised for
    ordinary and generated traffic."""
    check_filter({{ cookiecutter.__filter_class }}, {"allowed": ["blue"]})
