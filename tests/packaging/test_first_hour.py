"""A user's first hour, from the built wheels alone.

A fresh virtual environment (its own pip, no access to this checkout's packages) gets the
SDK and both codecs from the wheel files; their dependencies come from the package index
(or pip's cache). Every command then runs from a folder outside the checkout, with nothing of
the checkout on ``sys.path``: ``metaprotocol codecs`` and ``check``, ``metaprotocol new``
from the template inside the wheel, the generated package's install and ``ci.sh`` (its own
tests, the kit, ``metaprotocol check``), and the engine routing a request to its example
server. The outputs that ``docs/getting-started.md`` shows are compared with the real ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from dist_kit import REPO, artifact
from doc_output import assert_shown
from scaffold_kit import run, run_in_engine

PROTOCOL = "acme_rpc"
PACKAGE = "metaprotocol_acme_rpc"
PAGE = "getting-started.md"


def user_env(venv: Path, home: Path) -> dict[str, str]:
    """An activated venv, as a user's shell has it, with nothing of the checkout."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "VIRTUAL_ENV", "METAPROTOCOL", "COOKIECUTTER"))
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["HOME"] = str(home)  # cookiecutter's replay files land here, not in the real home
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")
    return env


def test_first_hour_from_the_wheels(dist: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    venv = tmp_path / "venv"
    run(["python3", "-m", "venv", venv], cwd=home, timeout=120)
    env = user_env(venv, home)
    python = venv / "bin" / "python"

    # Install exactly what docs/getting-started.md says, with the wheel files for names.
    sdk = artifact(dist, "metaprotocol_sdk", ".whl")
    codecs = [artifact(dist, f"metaprotocol_codec_{c}", ".whl") for c in ("dubbo", "thrift")]
    run(
        [python, "-m", "pip", "install", "-q", f"{sdk}[testing]", *codecs],
        cwd=home,
        env=env,
        timeout=600,
    )
    where = run(
        [python, "-c", "import metaprotocol_sdk, sys; print(metaprotocol_sdk.__file__)"],
        cwd=home,
        env=env,
    ).stdout.strip()
    assert where.startswith(str(venv)) and not where.startswith(str(REPO)), where

    # What is installed, as the page shows it.
    listed = run(["metaprotocol", "codecs"], cwd=home, env=env).stdout
    assert_shown(PAGE, "codecs", listed)

    # The kit against a reference codec, with the conformance material its wheel ships.
    report = run(["metaprotocol", "check", "dubbo"], cwd=home, env=env)
    assert report.stdout.rstrip().splitlines()[-1].startswith("PASSED ("), report.stdout

    # Scaffold from the template inside the SDK's wheel, install it as the tutorial says.
    made = run(["metaprotocol", "new", PROTOCOL, "--no-input"], cwd=home, env=env)
    project = home / "metaprotocol-codec-acme-rpc"
    assert f"created {project}" in made.stdout
    assert (project / ".github" / "workflows" / "ci.yml").is_file()
    run([python, "-m", "pip", "install", "-q", "-e", ".[dev]"], cwd=project, env=env, timeout=600)

    # Its own gates: ruff, mypy --strict against the installed SDK, pytest with the kit,
    # and `metaprotocol check acme_rpc`.
    ci = run([project / "ci.sh"], cwd=project, env=env, timeout=600)
    assert ci.stdout.rstrip().splitlines()[-1].startswith("PASSED ("), ci.stdout

    # The engine routes a request from the example client to the example server.
    outputs = run_in_engine(python, project, PACKAGE, tmp_path, env)
    assert '"x-routed-by": "metaprotocol-engine"' in outputs["server-received"]
