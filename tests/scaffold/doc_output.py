"""Compare command output shown in the docs with what the commands really print.

A page marks each output block it shows with an HTML comment on the line before the fence
(invisible in the built site)::

    <!-- output: check-stale -->
    ```console
    $ metaprotocol check acme_rpc --only golden_vectors
    conformance report for acme_rpc (...)
    ```

Lines starting with ``$ `` (and their ``\\`` continuations) are the command, not output. In
the shown output a line that is only ``...`` stands for any number of lines, and ``...``
inside a line for any text, so a page can shorten long output without lying about the rest.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"

_BLOCK = re.compile(r"<!-- output: ([\w-]+) -->\n```[\w-]*\n(.*?)^```", re.S | re.M)


def shown_outputs(page: str) -> dict[str, str]:
    """``{name: shown output}`` for every marked block of ``docs/<page>``."""
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks: dict[str, str] = {}
    for name, body in _BLOCK.findall(text):
        lines = body.splitlines()
        while lines and lines[0].startswith("$ "):
            while lines and lines.pop(0).endswith("\\"):
                pass
        blocks[name] = "\n".join(lines)
    return blocks


def _pattern(shown: str) -> re.Pattern[str]:
    parts = []
    for line in shown.rstrip().splitlines():
        line = line.rstrip()
        if line == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            body = ".*?".join(re.escape(piece) for piece in line.split("..."))
            parts.append(rf"{body}[ \t]*\n")
    return re.compile("".join(parts))


def assert_shown(page: str, name: str, actual: str) -> None:
    """The marked block ``name`` of ``docs/<page>`` matches ``actual`` (whole output)."""
    blocks = shown_outputs(page)
    assert name in blocks, f"docs/{page} has no block marked '<!-- output: {name} -->'"
    normalised = "\n".join(line.rstrip() for line in actual.rstrip().splitlines()) + "\n"
    if not _pattern(blocks[name]).fullmatch(normalised):
        raise AssertionError(
            f"docs/{page}, block {name!r} no longer matches the real output.\n"
            f"--- shown on the page\n{blocks[name]}\n--- real output\n{normalised}"
        )


def shown_tree(page: str, name: str) -> list[str]:
    """The file paths of the indented listing marked ``<!-- files: name -->`` in ``docs/<page>``
    (directories end in ``/``; four spaces per level; ``#`` starts a comment)."""
    text = (DOCS / page).read_text(encoding="utf-8")
    match = re.search(rf"<!-- files: {name} -->\n```\n(.*?)^```", text, re.S | re.M)
    assert match, f"docs/{page} has no listing marked '<!-- files: {name} -->'"
    stack: list[str] = []
    files = []
    for line in match.group(1).splitlines()[1:]:  # the first line is the root
        entry = line.split("#", 1)[0].strip()
        depth = (len(line) - len(line.lstrip())) // 4 - 1
        stack[depth:] = [entry]
        if not entry.endswith("/"):
            files.append("".join(stack))
    return files


def shown_excerpts(page: str) -> list[tuple[str, str]]:
    """``(path, text)`` of every block marked ``<!-- excerpt: path -->`` in ``docs/<page>``."""
    text = (DOCS / page).read_text(encoding="utf-8")
    found = re.findall(r"<!-- excerpt: (\S+) -->\n```[\w-]*\n(.*?)^```", text, re.S | re.M)
    return [(path, body) for path, body in found]
