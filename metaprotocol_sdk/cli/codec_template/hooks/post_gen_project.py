"""Finish the generated package: make the CI script executable, drop the files of a capability
the answers leave out, and print the next steps."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

PROTOCOL = "{{ cookiecutter.protocol_name }}"
PACKAGE = "{{ cookiecutter.package_name }}"
_STREAMING: str = "{{ cookiecutter.streaming }}"  # rendered as True or False
STREAMING = _STREAMING == "True"


def main() -> int:
    """Runs inside the generated project directory."""
    root = Path.cwd()
    script = root / "ci.sh"
    mode = script.stat().st_mode
    script.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    if not STREAMING:
        (root / "tests" / "test_engine.py").unlink()  # it runs a stream through the engine
    print(
        "next steps:\n"
        f"  cd {root}\n"
        "  pip install -e '.[dev]'              # into an environment that has metaprotocol-sdk\n"
        "  ./ci.sh                              # ruff, mypy --strict, pytest (with the kit)\n"
        f"  metaprotocol check {PROTOCOL}\n"
        "then, in three terminals (the server and the engine serve until Ctrl-C):\n"
        f"  python -m {PACKAGE}.example_server --port 9100\n"
        "  metaprotocol proxy -c deploy/mesh.yaml -c deploy/proxy.yaml\n"
        f"  python -m {PACKAGE}.example_client --port 9000\n"
        + (f"  python -m {PACKAGE}.example_client --port 9000 --stream\n" if STREAMING else "")
        + "README.md says what to change first."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
