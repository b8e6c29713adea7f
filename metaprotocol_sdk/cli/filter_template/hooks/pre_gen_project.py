"""Validate the answers before anything is generated.

Cookiecutter renders this file with the answers, runs it inside the freshly created project
directory and, when it exits non-zero, deletes that directory: a bad answer leaves nothing
half-generated behind. Every problem is reported at once, one ``error:`` line each, with what
to type instead.
"""

from __future__ import annotations

import json
import keyword
import re
import sys
from importlib.metadata import entry_points

# The answers, as JSON in a raw string: "'" is escaped, so no answer can end the string, and
# the quotes stay single because the JSON is full of double quotes.
ANSWERS = r'''{{ cookiecutter | jsonify | replace("'", "\\u0027") }}'''  # fmt: skip

#: Names of the engine's own chain steps (shown in /config_dump's ``chain``) and of the SDK's
#: example filter: a user filter under one of them would be ambiguous.
RESERVED_FILTERS = frozenset(
    {
        "router",
        "fault",
        "local_rate_limit",
        "mirror",
        "retries",
        "audit",
        "metaprotocol",
        "filter",
        "test",
        "tests",
    }
)
#: Package names that would shadow the SDK, its codecs or test tooling.
RESERVED_PACKAGES = frozenset(
    {
        "metaprotocol",
        "metaprotocol_sdk",
        "metaprotocol_dubbo",
        "metaprotocol_thrift",
        "test",
        "tests",
        "src",
    }
)
#: Distributions that already exist in the SDK's own tree.
RESERVED_DISTRIBUTIONS = frozenset(
    {"metaprotocol-sdk", "metaprotocol-codec-dubbo", "metaprotocol-codec-thrift"}
)
#: Longest accepted answers (generated lines stay within the 100-column lint limit).
LONGEST = {"filter_name": 24, "package_name": 40, "project_slug": 60, "description": 72}
LICENSES = ("Apache-2.0", "MIT", "BSD-3-Clause", "Proprietary")
AERAKI_PREFIX = "aeraki.meta_protocol.filters."

NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
PACKAGE_RE = re.compile(r"[a-z_][a-z0-9_]*\Z")
DISTRIBUTION_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\Z")
VERSION_RE = re.compile(r"\d+(?:\.\d+)*(?:(?:a|b|rc)\d+)?(?:\.post\d+)?(?:\.dev\d+)?\Z")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\Z")


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def installed_filters() -> dict[str, str]:
    """Filter names registered by installed distributions, mapped to the distribution."""
    names: dict[str, str] = {}
    for ep in entry_points(group="metaprotocol.filters"):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        names[ep.name.removeprefix(AERAKI_PREFIX)] = dist
    return names


def _text(answers: dict[str, object], key: str, problems: list[str]) -> str:
    value = answers.get(key)
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{key}: must not be empty")
        return ""
    if value != value.strip() or "\n" in value or "\r" in value:
        problems.append(f"{key}: {value!r} must be one line without surrounding spaces")
    return value


def validate(answers: dict[str, object], installed: dict[str, str]) -> list[str]:
    """Every problem with the answers, as messages that say what to type instead."""
    problems: list[str] = []
    name = _text(answers, "filter_name", problems)
    package = _text(answers, "package_name", problems)
    slug = _text(answers, "project_slug", problems)
    for key in ("description", "author", "author_email", "version", "license"):
        value = _text(answers, key, problems)
        if value and ('"' in value or "\\" in value):
            problems.append(f"{key}: {value!r} must not contain '\"' or '\\'")
    name_problems = len(problems)
    most = LONGEST["filter_name"]
    if len(name) > most:
        problems.append(f"filter_name: at most {most} characters, got {len(name)}")
    elif name and not NAME_RE.match(name):
        problems.append(
            f"filter_name: {name!r} is not a valid filter name; use lowercase letters, digits "
            "and '_', starting with a letter, e.g. 'tenant_guard'"
        )
    elif name and keyword.iskeyword(name):
        problems.append(f"filter_name: {name!r} is a Python keyword; choose another name")
    elif name in RESERVED_FILTERS:
        problems.append(
            f"filter_name: {name!r} is reserved (the engine or the SDK uses it); "
            "choose another name"
        )
    elif name and name in installed and _normalise(installed[name]) != _normalise(slug):
        problems.append(
            f"filter_name: a filter named {name!r} is already installed by "
            f"{installed[name]!r}; two filters cannot share a name in the "
            "'metaprotocol.filters' entry-point group"
        )
    name_ok = len(problems) == name_problems
    if not name_ok:
        # Names derived from a rejected filter name are wrong for the same reason: one line
        # about the name says it all (names the user typed differently are still checked).
        stem = name.replace("_", "-").lower()
        if name in package:
            package = ""
        if stem in slug.lower():
            slug = ""
    for key, most in LONGEST.items():
        given = {"package_name": package, "project_slug": slug}.get(key, answers.get(key))
        if key != "filter_name" and isinstance(given, str) and len(given) > most:
            problems.append(f"{key}: at most {most} characters, got {len(given)}")

    if package and not PACKAGE_RE.match(package):
        problems.append(
            f"package_name: {package!r} is not a valid Python package name; use lowercase "
            "letters, digits and '_', not starting with a digit"
        )
    elif package and keyword.iskeyword(package):
        problems.append(f"package_name: {package!r} is a Python keyword")
    elif package in RESERVED_PACKAGES:
        problems.append(f"package_name: {package!r} is reserved; choose another name")
    elif package in sys.stdlib_module_names:
        problems.append(
            f"package_name: {package!r} would shadow the standard library module of that name"
        )

    if slug and not DISTRIBUTION_RE.match(slug):
        problems.append(
            f"project_slug: {slug!r} is not a valid distribution name; use letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit"
        )
    elif _normalise(slug) in RESERVED_DISTRIBUTIONS:
        problems.append(f"project_slug: {slug!r} is reserved; choose another name")

    filter_class = answers.get("__filter_class")
    if name_ok and isinstance(filter_class, str) and not filter_class.isidentifier():
        problems.append(f"filter class name {filter_class!r} is not a Python identifier")

    email = answers.get("author_email")
    if isinstance(email, str) and email.strip() and not EMAIL_RE.match(email):
        problems.append(f"author_email: {email!r} is not an e-mail address")
    version = answers.get("version")
    if isinstance(version, str) and version.strip() and not VERSION_RE.match(version):
        problems.append(f"version: {version!r} is not a version such as 0.1.0")
    licence = answers.get("license")
    if isinstance(licence, str) and licence.strip() and licence not in LICENSES:
        problems.append(f"license: {licence!r} is not one of {', '.join(LICENSES)}")
    return problems


def main() -> int:
    """Exit non-zero with every problem listed, so cookiecutter deletes the output."""
    problems = validate(json.loads(ANSWERS), installed_filters())
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
