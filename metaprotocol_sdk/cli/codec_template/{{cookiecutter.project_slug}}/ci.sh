#!/usr/bin/env bash
# Every quality gate, in the order CI runs them. Run it from anywhere:
#   pip install -e '.[dev]'   (into an environment that has metaprotocol-sdk)
#   ./ci.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

# Run from the environment that has the SDK and the dev extra: say so, rather than fail on ruff.
if ! missing=$("$PYTHON" -c 'import importlib.util as u
needed = ("metaprotocol_sdk", "{{ cookiecutter.package_name }}",
          "ruff", "mypy", "pytest", "hypothesis")
print(*[m for m in needed if not u.find_spec(m)])'); then
    echo "error: cannot run $PYTHON: activate the environment that has metaprotocol-sdk" >&2
    echo "(or set PYTHON to its python)" >&2
    exit 2
fi
if [ -n "$missing" ]; then
    echo "error: $PYTHON lacks $missing: activate the environment that has metaprotocol-sdk" >&2
    echo "and run 'pip install -e .[dev]' in it (or set PYTHON to its python)" >&2
    exit 2
fi

echo "== ruff check";          "$PYTHON" -m ruff check .
echo "== ruff format --check"; "$PYTHON" -m ruff format --check .
# mypy cannot see an SDK installed in editable mode (an import-hook finder): give it the source.
SDK_SOURCE=$("$PYTHON" -c 'import pathlib, metaprotocol_sdk as m
root = pathlib.Path(m.__file__).parent.parent
print("" if root.name in ("site-packages", "dist-packages") else root)')
echo "== mypy --strict";       MYPYPATH=$SDK_SOURCE "$PYTHON" -m mypy --strict src tests
echo "== pytest (with the conformance kit)"
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"
echo "== metaprotocol check {{ cookiecutter.protocol_name }}"
"$PYTHON" -m metaprotocol_sdk check {{ cookiecutter.protocol_name }}
