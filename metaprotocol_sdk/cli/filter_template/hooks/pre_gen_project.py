"""Validate the answers before anything is generated.

Cookiecutter renders this file with the answers, runs it inside the freshly created project
directory and, when it exits non-zero, deletes that directory: a bad answer leaves nothing
half-generated behind. Every problem is reported at once, one ``error:`` line each, with what
to type instead. The checks both scaffolds share live in
``metaprotocol_sdk.cli.scaffold_answers``.
"""

from __future__ import annotations

import json
import keyword
import sys

from metaprotocol_sdk.cli import scaffold_answers as shared

# The answers, as JSON in a raw string: "'" is escaped, so no answer can end the string, and
# the quotes stay single because the JSON is full of double quotes.
ANSWERS = r'''{{ cookiecutter | jsonify | replace("'", "\\u0027") }}'''  # fmt: skip

#: Names of the engine's own chain steps (shown in /config_dump's ``chain``) and of the SDK's
#: example filter: a user filter under one of them would be ambiguous.
RESERVED_FILTERS = frozenset(
    {"router", "fault", "local_rate_limit", "mirror", "retries", "audit"}
    | {"metaprotocol", "filter", "test", "tests"}
)
#: Longest accepted answers (generated lines stay within the 100-column lint limit).
LONGEST = {"filter_name": 24, "package_name": 40, "project_slug": 60, "description": 72}
AERAKI_PREFIX = "aeraki.meta_protocol.filters."


def installed_filters() -> dict[str, str]:
    """Filter names registered by installed distributions, mapped to the distribution."""
    return shared.installed_names("metaprotocol.filters", AERAKI_PREFIX)


def _name_problems(name: str, slug: str, installed: dict[str, str]) -> list[str]:
    """What is wrong with ``filter_name`` (at most one message)."""
    most = LONGEST["filter_name"]
    if len(name) > most:
        return [f"filter_name: at most {most} characters, got {len(name)}"]
    if name and not shared.NAME_RE.match(name):
        return [
            f"filter_name: {name!r} is not a valid filter name; use lowercase letters, digits "
            "and '_', starting with a letter, e.g. 'tenant_guard'"
        ]
    if name and keyword.iskeyword(name):
        return [f"filter_name: {name!r} is a Python keyword; choose another name"]
    if name in RESERVED_FILTERS:
        return [
            f"filter_name: {name!r} is reserved (the engine or the SDK uses it); "
            "choose another name"
        ]
    if name and name in installed and shared.normalise(installed[name]) != shared.normalise(slug):
        return [
            f"filter_name: a filter named {name!r} is already installed by "
            f"{installed[name]!r}; two filters cannot share a name in the "
            "'metaprotocol.filters' entry-point group"
        ]
    return []


def validate(answers: dict[str, object], installed: dict[str, str]) -> list[str]:
    """Every problem with the answers, as messages that say what to type instead."""
    problems: list[str] = []
    name = shared.text(answers, "filter_name", problems)
    package = shared.text(answers, "package_name", problems)
    slug = shared.text(answers, "project_slug", problems)
    shared.check_metadata_text(answers, problems)
    name_problems = _name_problems(name, slug, installed)
    problems += name_problems
    if name_problems:
        # Names derived from a rejected filter name are wrong for the same reason: one line
        # about the name says it all (names the user typed differently are still checked).
        stem = name.replace("_", "-").lower()
        if name in package:
            package = ""
        if stem in slug.lower():
            slug = ""
    others = {k: v for k, v in LONGEST.items() if k != "filter_name"}
    shared.check_lengths(
        {**answers, "package_name": package, "project_slug": slug}, others, problems
    )
    shared.check_package(package, shared.RESERVED_PACKAGES, problems)
    shared.check_slug(slug, problems)
    if not name_problems:
        shared.check_class_name("filter", answers.get("__filter_class"), problems)
    shared.check_contact(answers, problems)
    return problems


def main() -> int:
    """Exit non-zero with every problem listed, so cookiecutter deletes the output."""
    problems = validate(json.loads(ANSWERS), installed_filters())
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
