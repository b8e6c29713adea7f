"""Validate the answers before anything is generated.

Cookiecutter renders this file with the answers, runs it inside the freshly created project
directory and, when it exits non-zero, deletes that directory: a bad answer leaves nothing
half-generated behind. Every problem is reported at once, each with what to type instead.
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

#: Protocol names that the SDK and its reference codecs already register.
RESERVED_PROTOCOLS = frozenset({"dubbo", "thrift", "kv", "metaprotocol", "codec", "test", "tests"})
#: Package names that would shadow the SDK, its codecs or test tooling.
RESERVED_PACKAGES = frozenset(
    {
        "metaprotocol",
        "metaprotocol_sdk",
        "metaprotocol_dubbo",
        "metaprotocol_thrift",
        "conformance",
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
LONGEST = {"protocol_name": 24, "package_name": 40, "project_slug": 60, "description": 72}
LICENSES = ("Apache-2.0", "MIT", "BSD-3-Clause", "Proprietary")
AERAKI_PREFIX = "aeraki.meta_protocol.codec."

PROTOCOL_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
PACKAGE_RE = re.compile(r"[a-z_][a-z0-9_]*\Z")
DISTRIBUTION_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\Z")
VERSION_RE = re.compile(r"\d+(?:\.\d+)*(?:(?:a|b|rc)\d+)?(?:\.post\d+)?(?:\.dev\d+)?\Z")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\Z")


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def installed_codecs() -> dict[str, str]:
    """Codec names registered by installed distributions, mapped to the distribution."""
    names: dict[str, str] = {}
    for ep in entry_points(group="metaprotocol.codecs"):
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
    protocol = _text(answers, "protocol_name", problems)
    package = _text(answers, "package_name", problems)
    slug = _text(answers, "project_slug", problems)
    for key in ("description", "author", "author_email", "version", "license"):
        value = _text(answers, key, problems)
        if value and ('"' in value or "\\" in value):
            problems.append(f"{key}: {value!r} must not contain '\"' or '\\'")
    for key, most in LONGEST.items():
        given = answers.get(key)
        if isinstance(given, str) and len(given) > most:
            problems.append(f"{key}: at most {most} characters, got {len(given)}")

    if protocol and not PROTOCOL_RE.match(protocol):
        problems.append(
            f"protocol_name: {protocol!r} is not a valid protocol name; use lowercase letters, "
            "digits and '_', starting with a letter (no '-': ServiceEntry port names "
            "tcp-metaprotocol-<protocol>-<name> use it as the separator), e.g. 'acme_rpc'"
        )
    elif protocol and keyword.iskeyword(protocol):
        problems.append(f"protocol_name: {protocol!r} is a Python keyword; choose another name")
    elif protocol in RESERVED_PROTOCOLS:
        problems.append(
            f"protocol_name: {protocol!r} is reserved (the SDK or its reference codecs use it); "
            "choose another name"
        )
    elif (
        protocol and protocol in installed and (_normalise(installed[protocol]) != _normalise(slug))
    ):
        problems.append(
            f"protocol_name: a codec named {protocol!r} is already installed by "
            f"{installed[protocol]!r}; two codecs cannot share a name in the "
            "'metaprotocol.codecs' entry-point group"
        )

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

    codec_class = answers.get("__codec_class")
    if protocol and isinstance(codec_class, str) and not codec_class.isidentifier():
        problems.append(f"codec class name {codec_class!r} is not a Python identifier")

    email = answers.get("author_email")
    if isinstance(email, str) and email.strip() and not EMAIL_RE.match(email):
        problems.append(f"author_email: {email!r} is not an e-mail address")
    version = answers.get("version")
    if isinstance(version, str) and version.strip() and not VERSION_RE.match(version):
        problems.append(f"version: {version!r} is not a version such as 0.1.0")
    licence = answers.get("license")
    if isinstance(licence, str) and licence.strip() and licence not in LICENSES:
        problems.append(f"license: {licence!r} is not one of {', '.join(LICENSES)}")
    for flag in ("heartbeat", "oneway", "rewrite_request_id"):
        if not isinstance(answers.get(flag), bool):
            problems.append(f"{flag}: answer yes or no, got {answers.get(flag)!r}")
    return problems


def main() -> int:
    """Exit non-zero with every problem listed, so cookiecutter deletes the output."""
    answers = json.loads(ANSWERS)
    problems = validate(answers, installed_codecs())
    if problems:
        print("error: cannot generate the codec package:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
