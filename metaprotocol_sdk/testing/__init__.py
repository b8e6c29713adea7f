"""The conformance kit: every rule of the codec contract as a named, reusable check.

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
    from .golden import GoldenFile, Sample, load_golden, load_golden_text
    from .known_failures import load_known_failures
    from .report import CheckResult, Outcome, Report
    from .runner import check_names, run_check, run_kit
    from .suite import CodecConformance
    from .target import CodecTarget, KitSettings

_WHERE = {
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
