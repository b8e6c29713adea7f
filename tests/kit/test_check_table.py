"""docs/testing.md's check table names every check, each with the rule it enforces."""

from __future__ import annotations

import re
from pathlib import Path

from metaprotocol_sdk.testing import check_names

PAGE = Path(__file__).parents[2] / "docs" / "testing.md"


def test_the_check_table_lists_every_check_in_run_order_with_its_rule() -> None:
    text = PAGE.read_text(encoding="utf-8")
    table = text.split("| Check | What it proves |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (.+) \|$", table, flags=re.MULTILINE)
    assert [name for name, _ in rows] == check_names()
    assert all(len(rule.split()) >= 5 for _, rule in rows), rows
