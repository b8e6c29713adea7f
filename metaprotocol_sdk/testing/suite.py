"""The pytest front end: subclass :class:`CodecConformance` and every check is a test.

::

    from metaprotocol_sdk.testing import CodecConformance
    from metaprotocol_mine import MyCodec

    class TestMyCodec(CodecConformance):
        codec = MyCodec

Each check becomes ``test_<check name>``; skips carry the check's reason, known failures are
xfails, and a known failure that now passes fails with "now passes, remove it".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import strategies as st

from metaprotocol_sdk.codec import Codec
from metaprotocol_sdk.errors import ConfigError, RegistryError
from metaprotocol_sdk.metadata import Metadata

from .checks import REGISTRY
from .hooks import Grown
from .known_failures import load_known_failures
from .report import CheckResult, Outcome
from .runner import check_names, run_check
from .target import CodecTarget, KitSettings

#: ``user_properties`` key under which each test records its check result for the plugin.
RESULT_PROPERTY = "metaprotocol_conformance"

_TARGETS: dict[type[Any], CodecTarget] = {}


class CodecConformance:
    """Base class of a codec's conformance suite. Set :attr:`codec`; everything else is optional.

    Anything left ``None`` is discovered from the codec's conformance package (see
    :mod:`metaprotocol_sdk.testing.discovery`).
    """

    #: The codec class, an installed codec name, or a ``module:Class`` reference.
    codec: ClassVar[type[Codec] | str | None] = None
    #: Codec options (default: the golden file's ``options``).
    options: ClassVar[Mapping[str, Any] | None] = None
    #: A golden-vector YAML file to use instead of the shipped one.
    golden: ClassVar[str | Path | None] = None
    #: ``{check: reason}`` or a known-failures YAML file.
    known_failures: ClassVar[Mapping[str, str] | str | Path | None] = None
    #: The mutation the round-trip checks write.
    mutation: ClassVar[Mapping[str, str] | None] = None
    #: The bytes a mutation must leave unchanged (default: the body).
    payload: ClassVar[Callable[[Metadata], bytes | memoryview] | None] = None
    #: How hard the kit pushes (example counts, time limits).
    settings: ClassVar[KitSettings | None] = None
    #: The conformance package to load instead of the discovered one.
    conformance: ClassVar[str | None] = None
    #: ``grown(n)``: named valid frames whose size grows with ``n`` (for ``perf_linear``).
    grown: ClassVar[Grown | None] = None

    @classmethod
    def messages(cls) -> st.SearchStrategy[Any] | None:
        """Override to supply a strategy of valid frame ``bytes`` or ``Sample`` values."""
        return None

    @classmethod
    def unusual_messages(cls) -> st.SearchStrategy[Any] | None:
        """Override to supply valid frames with unusual but legal content (reserved bits set,
        duplicate keys, non-canonical encodings) that ``encode`` must keep byte for byte."""
        return None

    @classmethod
    def conformance_target(cls) -> CodecTarget:
        """The target this suite checks (built once per class)."""
        target = _TARGETS.get(cls)
        if target is None:
            if cls.codec is None:
                pytest.fail(
                    f"{cls.__name__}: set `codec` to the codec class, an installed codec's "
                    "name or 'module:Class'",
                    pytrace=False,
                )
            known = cls.known_failures
            try:
                if isinstance(known, str | Path):
                    known = load_known_failures(known)
                target = CodecTarget.discover(
                    cls.codec,
                    options=cls.options,
                    golden=cls.golden,
                    messages=cls.messages(),
                    known_failures=known,
                    mutation=cls.mutation,
                    payload=cls.payload,
                    settings=cls.settings,
                    conformance=cls.conformance,
                    unusual=cls.unusual_messages(),
                    grown=cls.grown,
                )
            except (RegistryError, ConfigError) as exc:
                error = str(exc)
            else:
                _TARGETS[cls] = target
                return target
            # The user's setting (a name, a file), said as `metaprotocol check` says it, and
            # outside the except block: pytest would show the caught error as its context.
            codec = cls.codec if isinstance(cls.codec, str) else cls.codec.__qualname__
            pytest.fail(f"{cls.__name__} (codec {codec}): {error}", pytrace=False)
        return target


def report_outcome(result: CheckResult) -> None:
    """Turn a check result into the matching pytest outcome."""
    if result.outcome is Outcome.skipped:
        pytest.skip(result.reason)
    if result.outcome is Outcome.xfailed:
        pytest.xfail(result.reason)
    if result.outcome.is_failure:
        pytest.fail(f"{result.check}: {result.reason}", pytrace=False)


def _make_test(name: str) -> Callable[[CodecConformance, pytest.FixtureRequest], None]:
    def test(self: CodecConformance, request: pytest.FixtureRequest) -> None:
        target = type(self).conformance_target()
        result = run_check(target, name)
        request.node.user_properties.append(
            (RESULT_PROPERTY, {"codec": target.name, "notes": target.notes, **result.to_dict()})
        )
        report_outcome(result)

    test.__name__ = test.__qualname__ = f"test_{name}"
    test.__doc__ = REGISTRY[name].doc
    return test


for _name in check_names():
    setattr(CodecConformance, f"test_{_name}", _make_test(_name))
