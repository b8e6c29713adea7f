"""Checks of ``metaprotocol new`` answers shared by the codec and filter templates' hooks.

Each template's ``hooks/pre_gen_project.py`` checks its own name (protocol or filter) and calls
these for what both scaffolds ask: package, distribution, author, version and licence. Every
check appends messages that say what to type instead; nothing raises.
"""

from __future__ import annotations

import keyword
import re
import sys
from collections.abc import Mapping
from importlib.metadata import entry_points

#: Package names that would shadow the SDK, its codecs or test tooling.
RESERVED_PACKAGES = frozenset(
    {"metaprotocol", "metaprotocol_sdk", "metaprotocol_dubbo", "metaprotocol_thrift"}
    | {"test", "tests", "src"}
)
#: Distributions that already exist in the SDK's own tree.
RESERVED_DISTRIBUTIONS = frozenset(
    {"metaprotocol-sdk", "metaprotocol-codec-dubbo", "metaprotocol-codec-thrift"}
)
LICENSES = ("Apache-2.0", "MIT", "BSD-3-Clause", "Proprietary")
#: Lowercase identifier used for protocol and filter names (no '-': Istio port names use it).
NAME_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
PACKAGE_RE = re.compile(r"[a-z_][a-z0-9_]*\Z")
DISTRIBUTION_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\Z")
VERSION_RE = re.compile(r"\d+(?:\.\d+)*(?:(?:a|b|rc)\d+)?(?:\.post\d+)?(?:\.dev\d+)?\Z")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\Z")
#: Answers written into generated strings: they must be one line without quotes.
METADATA_KEYS = ("description", "author", "author_email", "version", "license")


def normalise(distribution: str) -> str:
    """A distribution name as packaging compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def installed_names(group: str, aeraki_prefix: str) -> dict[str, str]:
    """Names registered in the entry-point ``group``, mapped to their distribution."""
    names: dict[str, str] = {}
    for ep in entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        names[ep.name.removeprefix(aeraki_prefix)] = dist
    return names


def text(answers: Mapping[str, object], key: str, problems: list[str]) -> str:
    """The answer ``key`` as one non-empty line ("" with a problem when it is not)."""
    value = answers.get(key)
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{key}: must not be empty")
        return ""
    if value != value.strip() or "\n" in value or "\r" in value:
        problems.append(f"{key}: {value!r} must be one line without surrounding spaces")
    return value


def check_metadata_text(answers: Mapping[str, object], problems: list[str]) -> None:
    """The free-text answers are one line each, without quotes or backslashes."""
    for key in METADATA_KEYS:
        value = text(answers, key, problems)
        if value and ('"' in value or "\\" in value):
            problems.append(f"{key}: {value!r} must not contain '\"' or '\\'")


def check_lengths(
    values: Mapping[str, object], longest: Mapping[str, int], problems: list[str]
) -> None:
    """Each answer in ``values`` within its limit in ``longest``."""
    for key, most in longest.items():
        given = values.get(key)
        if isinstance(given, str) and len(given) > most:
            problems.append(f"{key}: at most {most} characters, got {len(given)}")


def check_package(package: str, reserved: frozenset[str], problems: list[str]) -> None:
    """``package_name`` is an importable name that shadows nothing."""
    if package and not PACKAGE_RE.match(package):
        problems.append(
            f"package_name: {package!r} is not a valid Python package name; use lowercase "
            "letters, digits and '_', not starting with a digit"
        )
    elif package and keyword.iskeyword(package):
        problems.append(f"package_name: {package!r} is a Python keyword")
    elif package in reserved:
        problems.append(f"package_name: {package!r} is reserved; choose another name")
    elif package in sys.stdlib_module_names:
        problems.append(
            f"package_name: {package!r} would shadow the standard library module of that name"
        )


def check_slug(slug: str, problems: list[str]) -> None:
    """``project_slug`` is a valid distribution name not used by the SDK's own tree."""
    if slug and not DISTRIBUTION_RE.match(slug):
        problems.append(
            f"project_slug: {slug!r} is not a valid distribution name; use letters, digits, "
            "'-', '_' and '.', starting and ending with a letter or digit"
        )
    elif normalise(slug) in RESERVED_DISTRIBUTIONS:
        problems.append(f"project_slug: {slug!r} is reserved; choose another name")


def check_class_name(kind: str, value: object, problems: list[str]) -> None:
    """The class name derived from the answers is a Python identifier."""
    if isinstance(value, str) and not value.isidentifier():
        problems.append(f"{kind} class name {value!r} is not a Python identifier")


def check_contact(answers: Mapping[str, object], problems: list[str]) -> None:
    """E-mail, version and licence have the shapes packaging accepts."""
    email = answers.get("author_email")
    if isinstance(email, str) and email.strip() and not EMAIL_RE.match(email):
        problems.append(f"author_email: {email!r} is not an e-mail address")
    version = answers.get("version")
    if isinstance(version, str) and version.strip() and not VERSION_RE.match(version):
        problems.append(f"version: {version!r} is not a version such as 0.1.0")
    licence = answers.get("license")
    if isinstance(licence, str) and licence.strip() and licence not in LICENSES:
        problems.append(f"license: {licence!r} is not one of {', '.join(LICENSES)}")
