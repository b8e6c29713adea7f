"""Known failures: checks an author has not made pass yet, each with a written reason.

File format (YAML), also accepted as a plain ``{check: reason}`` mapping in Python::

    known_failures:
      - check: bad_input_oversized_length
        reason: length is validated after the body is read; fix tracked in #12

A listed check that fails is reported as ``xfailed`` and does not fail the run. A listed check
that passes is reported as ``fixed`` and *does* fail the run with "now passes, remove it from
known failures" (strict xfail semantics), so the list only ever shrinks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metaprotocol_sdk.errors import ConfigError
from metaprotocol_sdk.textfiles import load_yaml_file


def parse_known_failures(document: Any, *, source: str = "<known failures>") -> dict[str, str]:
    """``{check: reason}`` from a loaded YAML document (``None`` gives an empty mapping)."""
    if document is None:
        return {}
    if isinstance(document, Mapping) and "known_failures" in document:
        document = document["known_failures"] or []
    if isinstance(document, Mapping):
        entries = [{"check": k, "reason": v} for k, v in document.items()]
    elif isinstance(document, list):
        entries = document
    else:
        raise ConfigError("expected a list of {check, reason} entries", source=source)
    result: dict[str, str] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: entry {index}"
        if not isinstance(entry, Mapping) or not entry.get("check"):
            raise ConfigError("each entry needs a check name", source=where, field="check")
        if not entry.get("reason"):
            raise ConfigError(
                "each known failure needs a written reason", source=where, field="reason"
            )
        result[str(entry["check"])] = str(entry["reason"])
    return result


def load_known_failures(path: str | Path) -> dict[str, str]:
    """``{check: reason}`` from a known-failures YAML file."""
    return parse_known_failures(load_yaml_file(path), source=str(path))
