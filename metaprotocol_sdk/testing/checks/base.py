"""The check registry and the context every check function receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metaprotocol_sdk.testing.target import CodecTarget


class CheckFailed(AssertionError):
    """A check found a contract violation; the message shows the bytes involved."""


class CheckSkipped(Exception):
    """A check cannot run for this codec; the message says why."""


@dataclass
class CheckContext:
    """What a check function gets: the target and a place to put measurements."""

    target: CodecTarget
    details: dict[str, Any] = field(default_factory=dict)


CheckFunction = Callable[[CheckContext], None]


@dataclass(frozen=True)
class Check:
    """One named check: the test name is ``test_<name>``."""

    name: str
    group: str
    func: CheckFunction
    #: Capabilities (:class:`~metaprotocol_sdk.Capabilities` fields) the check needs, all of them.
    requires: tuple[str, ...] = ()

    @property
    def doc(self) -> str:
        """First line of the check function's docstring."""
        return (self.func.__doc__ or "").strip().splitlines()[0]


#: Every check, in run order, by name.
REGISTRY: dict[str, Check] = {}


def check(
    name: str, group: str, *, requires: str | tuple[str, ...] = ()
) -> Callable[[CheckFunction], CheckFunction]:
    """Register a check function under ``name``; it needs every capability in ``requires``."""
    needs = (requires,) if isinstance(requires, str) else tuple(requires)

    def register(func: CheckFunction) -> CheckFunction:
        if name in REGISTRY:
            raise ValueError(f"check {name!r} is registered twice")
        REGISTRY[name] = Check(name=name, group=group, func=func, requires=needs)
        return func

    return register
