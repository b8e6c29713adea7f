"""The wheels and sdists are valid distributions and carry everything a user needs."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from dist_kit import PROJECTS, artifact

TEMPLATE = "metaprotocol_sdk/cli/codec_template"
SLUG = "{{cookiecutter.project_slug}}"
#: Template files a glob would miss (dot-files) or that make the scaffold work.
TEMPLATE_FILES = [
    "cookiecutter.json",
    "hooks/pre_gen_project.py",
    "hooks/post_gen_project.py",
    f"{SLUG}/.gitignore",
    f"{SLUG}/.github/workflows/ci.yml",
    f"{SLUG}/ci.sh",
    f"{SLUG}/deploy/proxy.yaml",
    f"{SLUG}/src/{{{{cookiecutter.package_name}}}}/conformance/golden.yaml",
]


def test_twine_check_passes(dist: Path) -> None:
    files = sorted(str(p) for p in dist.iterdir() if p.suffix in (".whl", ".gz"))
    assert len(files) == 2 * len(PROJECTS), files
    proc = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sdk_wheel_ships_the_template_and_nothing_stale(dist: Path) -> None:
    names = zipfile.ZipFile(artifact(dist, "metaprotocol_sdk", ".whl")).namelist()
    for file in TEMPLATE_FILES:
        assert f"{TEMPLATE}/{file}" in names, file
    assert "metaprotocol_sdk/py.typed" in names
    assert not [n for n in names if "__pycache__" in n or ".ruff_cache" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith(("tests/", "docs/", "bench/"))]


def test_sdk_sdist_ships_the_template(dist: Path) -> None:
    with tarfile.open(artifact(dist, "metaprotocol_sdk", ".tar.gz")) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for file in TEMPLATE_FILES:
        assert f"{TEMPLATE}/{file}" in names, file


def test_codec_wheels_ship_their_conformance_material(dist: Path) -> None:
    for name, package in (
        ("metaprotocol_codec_dubbo", "metaprotocol_dubbo"),
        ("metaprotocol_codec_thrift", "metaprotocol_thrift"),
    ):
        names = zipfile.ZipFile(artifact(dist, name, ".whl")).namelist()
        assert f"{package}/py.typed" in names
        assert any(n.startswith(f"{package}/conformance/golden") for n in names), names
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        text = zipfile.ZipFile(artifact(dist, name, ".whl")).read(entry_points).decode()
        assert "[metaprotocol.codecs]" in text
