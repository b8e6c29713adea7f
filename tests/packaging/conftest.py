"""Build the SDK's and both codecs' wheels and sdists once per test session.

``./dev test`` builds them before pytest runs (``./dev dist``) and names the folder in
``$METAPROTOCOL_DIST``; otherwise this session builds them itself with ``python -m build``.
The scaffold tests' helpers (``scaffold_kit``, ``doc_output``) are shared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for folder in (HERE, HERE.parent / "scaffold"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from dist_kit import DIST_ENV, PROJECTS, complete  # noqa: E402


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one wheel and one sdist per project, built from this checkout."""
    given = os.environ.get(DIST_ENV)
    if given and complete(Path(given)):
        return Path(given)
    out = tmp_path_factory.mktemp("dist")
    for source in PROJECTS.values():
        # A stale SOURCES.txt from an earlier build would add files the configuration no
        # longer lists to the sdist (and so to the wheel built from it).
        for stale in [*source.glob("*.egg-info"), *source.glob("src/*.egg-info")]:
            shutil.rmtree(stale, ignore_errors=True)
        # The wheel is built from the sdist, so a file missing from the sdist shows up here.
        proc = subprocess.run(
            [sys.executable, "-m", "build", "-q", "-o", str(out), str(source)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, f"python -m build {source} failed:\n{proc.stderr}"
    return out
