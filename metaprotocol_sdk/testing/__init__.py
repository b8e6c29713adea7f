"""The conformance kit: every rule of the codec contract as a named, reusable check.

Two front ends share one set of checks: the pytest suite (:class:`CodecConformance`) and
``metaprotocol check CODEC``. Both build a :class:`CodecTarget` and call the runner. Importing
this package needs ``hypothesis``; :mod:`.suite` also needs ``pytest``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .golden import GoldenFile, Sample, load_golden, load_golden_text
from .known_failures import load_known_failures
from .report import CheckResult, Outcome, Report
from .runner import check_names, run_check, run_kit
from .target import CodecTarget, KitSettings

if TYPE_CHECKING:
    from .suite import CodecConformance


def __getattr__(name: str) -> Any:
    # The pytest suite is imported on first use, so the CLI does not need pytest.
    if name == "CodecConformance":
        from .suite import CodecConformance

        return CodecConformance
    raise AttributeError(name)


__all__ = [
    "CheckResult",
    "CodecConformance",
    "CodecTarget",
    "GoldenFile",
    "KitSettings",
    "Outcome",
    "Report",
    "Sample",
    "check_names",
    "load_golden",
    "load_golden_text",
    "load_known_failures",
    "run_check",
    "run_kit",
]
