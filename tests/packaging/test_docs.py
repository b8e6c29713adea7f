"""The documentation builds from any working directory and documents the whole public API."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dist_kit import REPO

#: Public modules whose exported names the API reference must document.
PUBLIC = ("metaprotocol_sdk", "metaprotocol_sdk.testing", "metaprotocol_sdk.proxy")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built with ``--strict`` from a directory outside the checkout."""
    out = tmp_path_factory.mktemp("site")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet"),
            *("-f", str(REPO / "mkdocs.yml"), "--site-dir", str(out)),
        ],
        cwd=elsewhere,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def documented(site: Path) -> set[str]:
    """The last component of every object heading in the API reference."""
    names = set()
    for page in (site / "reference").rglob("index.html"):
        for anchor in re.findall(r'<h[2-4] id="([\w.]+)"', page.read_text("utf-8")):
            names.add(anchor.rsplit(".", 1)[-1])
    return names


def test_every_public_name_is_in_the_api_reference(site: Path) -> None:
    names = documented(site)
    missing = []
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        exported = getattr(module, "__all__", None) or [
            n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))
        ]
        missing += [
            f"{module_name}.{n}" for n in exported if n not in names and not n.startswith("__")
        ]
    assert not missing, f"not in the API reference: {missing}"
