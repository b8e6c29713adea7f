"""Validate the answers before anything is generated.

Cookiecutter renders this file with the answers, runs it inside the freshly created project
directory and, when it exits non-zero, deletes that directory: a bad answer leaves nothing
half-generated behind. Every problem is reported at once, each with what to type instead. The
checks both scaffolds share live in ``metaprotocol_sdk.cli.scaffold_answers``.
"""

from __future__ import annotations

import json
import keyword
import sys

from metaprotocol_sdk.cli import scaffold_answers as shared

# The answers, as JSON in a raw string: "'" is escaped, so no answer can end the string, and
# the quotes stay single because the JSON is full of double quotes.
ANSWERS = r'''{{ cookiecutter | jsonify | replace("'", "\\u0027") }}'''  # fmt: skip

#: Protocol names that the SDK and its reference codecs already register.
RESERVED_PROTOCOLS = frozenset({"dubbo", "thrift", "kv", "metaprotocol", "codec", "test", "tests"})
#: Package names that would shadow the SDK, its codecs, the kit or test tooling.
RESERVED_PACKAGES = shared.RESERVED_PACKAGES | {"conformance"}
#: Longest accepted answers (generated lines stay within the 100-column lint limit).
LONGEST = {"protocol_name": 24, "package_name": 40, "project_slug": 60, "description": 72}
AERAKI_PREFIX = "aeraki.meta_protocol.codec."


def installed_codecs() -> dict[str, str]:
    """Codec names registered by installed distributions, mapped to the distribution."""
    return shared.installed_names("metaprotocol.codecs", AERAKI_PREFIX)


def validate(answers: dict[str, object], installed: dict[str, str]) -> list[str]:
    """Every problem with the answers, as messages that say what to type instead."""
    problems: list[str] = []
    protocol = shared.text(answers, "protocol_name", problems)
    package = shared.text(answers, "package_name", problems)
    slug = shared.text(answers, "project_slug", problems)
    shared.check_metadata_text(answers, problems)
    shared.check_lengths(answers, LONGEST, problems)

    if protocol and not shared.NAME_RE.match(protocol):
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
    elif protocol in installed and shared.normalise(installed[protocol]) != shared.normalise(slug):
        problems.append(
            f"protocol_name: a codec named {protocol!r} is already installed by "
            f"{installed[protocol]!r}; two codecs cannot share a name in the "
            "'metaprotocol.codecs' entry-point group"
        )

    shared.check_package(package, RESERVED_PACKAGES, problems)
    shared.check_slug(slug, problems)
    if protocol:
        shared.check_class_name("codec", answers.get("__codec_class"), problems)
    shared.check_contact(answers, problems)
    for flag in ("heartbeat", "oneway", "rewrite_request_id", "streaming"):
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
