"""The conformance kit: every rule of the codec contract as a named, reusable check.

Filters have their harness here too (:mod:`.filters`: :class:`FilterHarness`,
:func:`check_filter`, :class:`FilterConformance`).

Two front ends share one set of checks: the pytest suite (:class:`CodecConformance`) and
``metaprotocol check CODEC``. Both build a :class:`CodecTarget` and call the runner.

Names are imported on first use: the pytest plugin (:mod:`.plugin`) lives in this package and
is loaded by every pytest run, so importing the package itself must cost nothing and need
neither ``hypothesis`` nor the checks. The kit proper needs ``hypothesis``; the suite also
needs ``pytest``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .filters import (
        FilterCheckError,
        FilterConformance,
        FilterHarness,
        RequestOutcome,
        check_filter,
        check_ordinary_traffic,
        check_refuses_unknown_config,
    )
    from .golden import GoldenFile, Sample, load_golden, load_golden_text
    from .known_failures import load_known_failures
    from .report import CheckResult, Outcome, Report
    from .runner import check_names, run_check, run_kit
    from .suite import CodecConformance
    from .target import CodecTarget, KitSettings

_WHERE = {
    "FilterCheckError": "filters",
    "FilterConformance": "filters",
    "FilterHarness": "filters",
    "RequestOutcome": "filters",
    "check_filter": "filters",
    "check_ordinary_traffic": "filters",
    "check_refuses_unknown_config": "filters",
    "GoldenFile": "golden",
    "Sample": "golden",
    "load_golden": "golden",
    "load_golden_text": "golden",
    "load_known_failures": "known_failures",
    "CheckResult": "report",
    "Outcome": "report",
    "Report": "report",
    "check_names": "runner",
    "run_check": "runner",
    "run_kit": "runner",
    "CodecConformance": "suite",
    "CodecTarget": "target",
    "KitSettings": "target",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "CheckResult",
    "CodecConformance",
    "CodecTarget",
    "FilterCheckError",
    "FilterConformance",
    "FilterHarness",
    "GoldenFile",
    "KitSettings",
    "Outcome",
    "Report",
    "RequestOutcome",
    "Sample",
    "check_filter",
    "check_names",
    "check_ordinary_traffic",
    "check_refuses_unknown_config",
    "load_golden",
    "load_golden_text",
    "load_known_failures",
    "run_check",
    "run_kit",
]
