"""check_filter passes the example filter and catches each planted broken filter."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, Self

import pytest

from metaprotocol_sdk import ConfigError, ErrorType
from metaprotocol_sdk.examples.audit_filter import AuditFilter
from metaprotocol_sdk.filters import Filter, RequestContext, ResponseContext
from metaprotocol_sdk.testing import (
    FilterCheckError,
    FilterConformance,
    check_filter,
    check_ordinary_traffic,
    check_refuses_unknown_config,
)

EXAMPLES = 60  # enough to find every planted bug below; keeps the file quick


def test_the_example_filter_passes() -> None:
    check_filter(AuditFilter, {"auditor": "ci", "required": ["method"]}, max_examples=EXAMPLES)


# -- configuration -----------------------------------------------------------------------------


class SwallowsSettings(Filter):
    """Accepts any key: a user's typo would be silently ignored."""

    name = "swallow"

    def __init__(self, **settings: Any) -> None:
        self.settings = settings


class CrashingConfig(Filter):
    """Its own from_config fails with a KeyError instead of a ConfigError."""

    name = "crashing-config"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None) -> Self:
        config = dict(config or {})
        for key in config:
            {"limit": 1}[key]
        return cls()


class VagueConfig(Filter):
    """Refuses an unknown key without saying which."""

    name = "vague"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None) -> Self:
        if config:
            raise ConfigError("bad configuration")
        return cls()


class NeedsASetting(Filter):
    name = "needs"

    def __init__(self, *, limit: int) -> None:
        self.limit = limit


@pytest.mark.parametrize(
    ("broken", "config", "says"),
    [
        (SwallowsSettings, None, "accepted the unknown setting"),
        (CrashingConfig, None, "raised KeyError for an unknown setting instead of ConfigError"),
        (VagueConfig, None, "without naming it"),
        (NeedsASetting, None, "refused a valid configuration"),
    ],
)
def test_configuration_checks_catch(
    broken: type[Filter], config: dict[str, Any] | None, says: str
) -> None:
    with pytest.raises(FilterCheckError, match=says):
        check_refuses_unknown_config(broken, config)


def test_a_required_setting_given_passes() -> None:
    check_refuses_unknown_config(NeedsASetting, {"limit": 3})


# -- traffic -----------------------------------------------------------------------------------


class AssumesMethod(Filter):
    """Reads an attribute a request may not have."""

    name = "assumes-method"

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        context.add_mutation("x-method", context.request.attributes["method"])
        return None


class AsciiOnly(Filter):
    """Breaks only on some values (what hypothesis is for)."""

    name = "ascii-only"

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        for value in context.request.attributes.values():
            value.encode("ascii")
        return None


class IntMutation(Filter):
    """Adds a value the codec cannot write."""

    name = "int-mutation"

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        context.add_mutation("x-count", len(context.request.attributes))  # type: ignore[arg-type]
        return None


class NotAnErrorType(Filter):
    name = "not-an-error-type"

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        context.local_reply(429, "slow down")  # type: ignore[arg-type]
        return None


class ReturnsTrue(Filter):
    name = "returns-true"

    def on_request(self, context: RequestContext) -> Awaitable[None] | None:
        return True  # type: ignore[return-value]


class AssumesRemoteAnswers(Filter):
    """Forgets that local replies (and replies it did not ask to decode) carry no
    attributes."""

    name = "assumes-remote"
    response_attributes = True

    def on_response(self, context: ResponseContext) -> None:
        assert context.attributes is not None
        context.attributes.get("server")


class AssumesLocalError(Filter):
    name = "assumes-local-error"

    def on_response(self, context: ResponseContext) -> None:
        if context.status.name == "Error":
            self.last = context.local_error.name  # type: ignore[union-attr]  # None: upstream


@pytest.mark.parametrize(
    ("broken", "says"),
    [
        (AssumesMethod, r"on_request raised KeyError"),
        (AsciiOnly, r"on_request raised UnicodeEncodeError"),
        (IntMutation, r"on_request added a mutation that is not str to str: 'x-count': 0"),
        (NotAnErrorType, r"on_request answered with 429, which is not an ErrorType"),
        (ReturnsTrue, r"on_request returned True, which is neither None nor an awaitable"),
        (AssumesRemoteAnswers, r"on_response raised AssertionError"),
        (AssumesLocalError, r"on_response raised AttributeError"),
    ],
)
def test_traffic_checks_catch(broken: type[Filter], says: str) -> None:
    with pytest.raises(FilterCheckError, match=says) as caught:
        check_ordinary_traffic(broken, max_examples=EXAMPLES)
    assert "input: " in str(caught.value)  # the failing request or answer is shown


def test_check_filter_runs_both() -> None:
    with pytest.raises(FilterCheckError, match="accepted the unknown setting"):
        check_filter(SwallowsSettings, max_examples=EXAMPLES)
    with pytest.raises(FilterCheckError, match="on_request raised KeyError"):
        check_filter(AssumesMethod, max_examples=EXAMPLES)


def test_error_type_members_are_accepted() -> None:
    class Limits(Filter):
        name = "limits"

        def on_request(self, context: RequestContext) -> Awaitable[None] | None:
            context.local_reply(ErrorType.OverLimit, "limited")
            return None

    check_ordinary_traffic(Limits, max_examples=10)


# -- the pytest front end ----------------------------------------------------------------------


class TestAuditConformance(FilterConformance):
    """What a filter author writes: the checks become tests of this class."""

    filter = "metaprotocol_sdk.examples.audit_filter:AuditFilter"
    config = {"required": ["method"]}
    max_examples = EXAMPLES


class SwallowingSuite(FilterConformance):
    filter = SwallowsSettings


class AssumingSuite(FilterConformance):
    filter = AssumesMethod
    max_examples = EXAMPLES


def test_the_front_end_runs_each_check_on_its_filter() -> None:
    assert TestAuditConformance.filter_class() is AuditFilter
    with pytest.raises(FilterCheckError, match="accepted the unknown setting"):
        SwallowingSuite().test_refuses_unknown_config()
    SwallowingSuite().test_ordinary_traffic()  # nothing wrong with its traffic
    AssumingSuite().test_refuses_unknown_config()
    with pytest.raises(FilterCheckError, match="on_request raised KeyError"):
        AssumingSuite().test_ordinary_traffic()
    with pytest.raises(TypeError, match="set the class attribute 'filter'"):
        FilterConformance.filter_class()
