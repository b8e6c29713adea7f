"""Run checks against a target and turn what happened into :class:`CheckResult` values.

Both front ends use this: the pytest suite runs one check per test, ``metaprotocol check``
runs them all. Known failures are applied here, so both report the same outcomes.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable

from .checks import REGISTRY, Check, CheckContext, CheckFailed, CheckSkipped
from .checks._support import codec_line
from .report import CheckResult, Outcome, Report
from .target import CodecTarget

GROUP_ORDER = ("golden", "framing", "roundtrip", "errors", "bad_input", "state", "perf")


def all_checks() -> list[Check]:
    """Every registered check, in run order (by group, then registration)."""
    checks = list(REGISTRY.values())
    return sorted(checks, key=lambda c: GROUP_ORDER.index(c.group))


def check_names() -> list[str]:
    """The names of every check, in run order."""
    return [c.name for c in all_checks()]


def _raw_result(target: CodecTarget, check: Check) -> CheckResult:
    for needed in check.requires:
        if not getattr(target.codec.capabilities, needed):
            return CheckResult(
                check.name,
                Outcome.skipped,
                f"codec does not declare the {needed!r} capability (Capabilities.{needed}=False)",
            )
    ctx = CheckContext(target)
    try:
        check.func(ctx)
    except CheckSkipped as exc:
        return CheckResult(check.name, Outcome.skipped, str(exc), details=ctx.details)
    except CheckFailed as exc:
        return CheckResult(check.name, Outcome.failed, str(exc), details=ctx.details)
    except Exception as exc:
        trace = "".join(traceback.format_exception(exc, limit=-6))
        where = codec_line(exc, target.codec)
        if _while_generating(exc):
            # Hypothesis notes where a draw failed: the author's strategy, not the codec.
            reason = (
                f"the messages strategy raised {type(exc).__name__}: {exc}{where or ''} while "
                "it generated a message, before the codec was called: make the strategy "
                "(messages() or unusual_messages() in the codec's conformance package) draw "
                f"only frames it can build\n{trace}"
            )
        elif where is None:
            reason = f"unexpected {type(exc).__name__}: {exc}\n{trace}"
        else:
            # The codec's own code raised where the check called it directly.
            reason = (
                f"the codec raised {type(exc).__name__}: {exc}{where}; only CodecError "
                "subclasses may escape a codec's methods (FramingError for bytes that are "
                f"not a frame, MutationError for a mutation it cannot write)\n{trace}"
            )
        return CheckResult(check.name, Outcome.failed, reason, details=ctx.details)
    return CheckResult(
        check.name, Outcome.passed, str(ctx.details.get("summary", "")), details=ctx.details
    )


def _while_generating(exc: BaseException) -> bool:
    """Whether hypothesis noted that ``exc`` came from drawing a value (a strategy's code)."""
    notes = getattr(exc, "__notes__", ())
    return any(isinstance(n, str) and n.startswith("while generating ") for n in notes)


def run_check(target: CodecTarget, name: str) -> CheckResult:
    """Run the named check and apply the target's known failures."""
    check = REGISTRY[name]
    start = time.perf_counter()
    result = _raw_result(target, check)
    result.duration = time.perf_counter() - start
    known = target.known_failures.get(name)
    if known is None:
        return result
    if result.outcome is Outcome.failed:
        result.outcome = Outcome.xfailed
        result.reason = f"known failure: {known}\n{result.reason}"
    elif result.outcome is Outcome.passed:
        result.outcome = Outcome.fixed
        result.reason = (
            f"{name} now passes, remove it from known failures (listed because: {known})"
        )
    return result


def run_kit(target: CodecTarget, names: Iterable[str] | None = None) -> Report:
    """Run every check (or the named ones) and return the report."""
    report = Report(codec=target.name, notes=list(target.notes))
    unknown = sorted(set(target.known_failures) - set(REGISTRY))
    if unknown:
        report.notes.append(f"known failures name unknown checks: {', '.join(unknown)}")
    for name in names if names is not None else check_names():
        report.results.append(run_check(target, name))
    return report
