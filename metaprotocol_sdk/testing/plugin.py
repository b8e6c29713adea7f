"""The pytest plugin (``pytest11`` entry point ``metaprotocol``).

It adds a conformance summary to the terminal report (one line per check with its outcome and
reason, throughput numbers, what was not covered) and ``--conformance-json PATH`` to write the
same results as JSON. It imports nothing heavy, so installing the SDK never slows down or breaks
an unrelated pytest run; the checks themselves live in :mod:`metaprotocol_sdk.testing.suite`.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

#: Must match :data:`metaprotocol_sdk.testing.suite.RESULT_PROPERTY`.
RESULT_PROPERTY = "metaprotocol_conformance"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--conformance-json``."""
    group = parser.getgroup("metaprotocol", "MetaProtocol conformance kit")
    group.addoption(
        "--conformance-json",
        metavar="PATH",
        default=None,
        help="write every conformance check result to PATH as JSON",
    )


class ConformanceCollector:
    """Collects the results suite tests record and reports them at the end of the run."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep the result a conformance test recorded in its ``user_properties``."""
        if report.when != "call":
            return
        for key, value in report.user_properties:
            if key == RESULT_PROPERTY and isinstance(value, dict):
                self.results.append({"nodeid": report.nodeid, **value})

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """Print the summary; write the JSON report if ``--conformance-json`` was given."""
        if not self.results:
            return
        tr = terminalreporter
        tr.write_sep("=", "metaprotocol conformance")
        by_codec: dict[str, list[dict[str, Any]]] = {}
        for result in self.results:
            by_codec.setdefault(result["codec"], []).append(result)
        for codec, rows in by_codec.items():
            tr.write_line(f"{codec}:")
            width = max(len(r["check"]) for r in rows)
            for r in rows:
                reason = (r["reason"].splitlines() or [""])[0]
                tr.write_line(f"  {r['check']:<{width}}  {r['outcome'].upper():<7}  {reason}")
            for note in rows[0].get("notes", []):
                tr.write_line(f"  not covered: {note}")
        path = self.config.getoption("conformance_json")
        if path:
            failed = any(r["outcome"] in ("failed", "fixed") for r in self.results)
            document = {"passed": not failed, "results": self.results}
            text = json.dumps(document, indent=2, ensure_ascii=False)
            Path(path).write_text(text, encoding="utf-8")
            tr.write_line(f"conformance report written to {path}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Place a conformance check's skip at the user's suite class, not inside the kit.

    ``pytest.skip`` records where it was raised, which for every check is the kit's own
    ``suite.py``; ``-rs`` would then point every skip there. The user's class (file and line)
    is where the codec is named, so the reason reads as being about their codec.
    """
    report = yield
    if report.skipped and report.when == "call" and isinstance(report.longrepr, tuple):
        recorded = any(key == RESULT_PROPERTY for key, _ in item.user_properties)
        suite = item.getparent(pytest.Class)
        if recorded and suite is not None:
            path, line, _ = suite.reportinfo()
            if line is not None:
                report.longrepr = (str(path), line + 1, report.longrepr[2])
    return report


def pytest_configure(config: pytest.Config) -> None:
    """Register the result collector."""
    config.pluginmanager.register(ConformanceCollector(config), "metaprotocol-conformance")
