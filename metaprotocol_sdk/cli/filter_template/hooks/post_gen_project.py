"""Finish the generated package: make the CI script executable and print the next steps."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

PACKAGE = "{{ cookiecutter.package_name }}"


def main() -> int:
    """Runs inside the generated project directory."""
    root = Path.cwd()
    script = root / "ci.sh"
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    print(
        "next steps:\n"
        f"  cd {root}\n"
        "  pip install -e '.[dev]'              # into an environment that has metaprotocol-sdk\n"
        "  ./ci.sh                              # ruff, mypy --strict, pytest, proxy --check\n"
        "then, in three terminals (the server and the engine serve until Ctrl-C):\n"
        f"  python -m {PACKAGE}.example_server --port 9100\n"
        "  metaprotocol proxy -c deploy/mesh.yaml -c deploy/proxy.yaml\n"
        f"  python -m {PACKAGE}.example_client --port 9000 --header tenant=blue\n"
        "README.md says what to change first."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
