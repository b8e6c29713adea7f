"""Check results and the report both front ends (pytest, ``metaprotocol check``) print."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    """How one check ended.

    ``xfailed``: listed in known failures and still failing (does not fail the run).
    ``fixed``: listed in known failures but now passes; this fails the run, so the stale entry
    gets removed (strict xfail semantics).
    """

    passed = "passed"
    failed = "failed"
    skipped = "skipped"
    xfailed = "xfailed"
    fixed = "fixed"

    @property
    def is_failure(self) -> bool:
        """True for outcomes that make the run fail."""
        return self in (Outcome.failed, Outcome.fixed)


@dataclass
class CheckResult:
    """The result of one named check: outcome, a human reason and optional measurements."""

    check: str
    outcome: Outcome
    reason: str = ""
    duration: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "check": self.check,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "duration": round(self.duration, 4),
            "details": self.details,
        }


@dataclass
class Report:
    """Every check's result for one codec, plus what the run could not cover."""

    codec: str
    results: list[CheckResult] = field(default_factory=list)
    #: Coverage notes: what was not checked and why (no golden vectors, no strategy, ...).
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no check failed (skips and known failures do not fail the run)."""
        return not any(r.outcome.is_failure for r in self.results)

    def counts(self) -> dict[str, int]:
        """Number of results per outcome."""
        counts = {o.value: 0 for o in Outcome}
        for result in self.results:
            counts[result.outcome.value] += 1
        return counts

    def result(self, check: str) -> CheckResult:
        """The result of the named check."""
        for result in self.results:
            if result.check == check:
                return result
        raise KeyError(check)

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable report (what ``metaprotocol check --json`` prints)."""
        return {
            "codec": self.codec,
            "passed": self.passed,
            "counts": self.counts(),
            "notes": self.notes,
            "results": [r.to_dict() for r in self.results],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def format_text(self, *, verbose: bool = False) -> str:
        """A readable report: one line per check, failure reasons in full below the table."""
        width = max((len(r.check) for r in self.results), default=5)
        lines = [f"conformance report for {self.codec}", ""]
        for r in self.results:
            summary = r.reason.splitlines()[0] if r.reason else ""
            lines.append(f"  {r.check:<{width}}  {r.outcome.value.upper():<7}  {summary}")
        failures = [r for r in self.results if r.outcome.is_failure or (verbose and r.reason)]
        for r in failures:
            lines += ["", f"--- {r.check}: {r.outcome.value}", r.reason]
        if self.notes:
            lines += ["", "not covered:"] + [f"  - {note}" for note in self.notes]
        counts = ", ".join(f"{n} {o}" for o, n in self.counts().items() if n)
        verdict = "PASSED" if self.passed else "FAILED"
        lines += ["", f"{verdict} ({counts})"]
        return "\n".join(lines)
