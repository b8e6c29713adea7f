"""The generated package's README, comments and scripts name only paths and commands that
exist: every file path, every ``python -m`` module and every ``metaprotocol`` subcommand.

(That the named commands also *work* is shown end to end by ``test_first_codec.py``, which
runs them as the README says, and ``tests/packaging``, which does so from the wheels.)
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from scaffold_kit import PYTHON, isolated_env, run

from metaprotocol_sdk.cli import _COMMANDS

PACKAGE = "metaprotocol_acme"
PATH = re.compile(
    r"(?:(?<=\./)|(?<![\w/.-]))((?:src|deploy|tests|\.github)/[\w./-]*[\w/]|[\w-]+\.(?:py|yaml|toml|sh|yml))\b"
)
MODULE = re.compile(r"python -m ([\w.<>]+)")
SUBCOMMAND = re.compile(r"(?<![\w-])metaprotocol ([a-z]+)\b")


@pytest.fixture(scope="module", params=["default", "streaming"])
def rendered(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[Path, str]:
    """A package from ``metaprotocol new`` (also with ``--streaming``, whose README and next
    steps say more) and what the command printed (its next steps)."""
    tmp = tmp_path_factory.mktemp("render")
    options = ["--streaming"] if request.param == "streaming" else []
    made = run(
        [PYTHON, "-m", "metaprotocol_sdk", "new", "acme", "--no-input", "-o", tmp, *options],
        env=isolated_env(tmp),
    )
    return tmp / "metaprotocol-codec-acme", made.stdout


def texts(rendered: tuple[Path, str]) -> dict[str, str]:
    """Every generated file's text, and the printed next steps."""
    project, printed = rendered
    found = {
        str(p.relative_to(project)): p.read_text("utf-8")
        for p in sorted(project.rglob("*"))
        if p.is_file() and p.suffix != ".pyc"
    }
    return {**found, "(printed by metaprotocol new)": printed}


def test_the_checks_see_what_is_named(rendered: tuple[Path, str]) -> None:
    """The patterns find the names the README and the next steps use (so they check them)."""
    everything = "\n".join(texts(rendered).values())
    assert {"deploy/mesh.yaml", "deploy/proxy.yaml", "ci.sh"} <= set(PATH.findall(everything))
    assert f"{PACKAGE}.example_server" in MODULE.findall(everything)
    assert {"check", "proxy", "new"} <= set(SUBCOMMAND.findall(everything))


def test_named_paths_exist(rendered: tuple[Path, str]) -> None:
    project = rendered[0]
    names = {p.name for p in project.rglob("*")}
    missing = []
    for where, text in texts(rendered).items():
        for path in PATH.findall(text):
            found = (project / path).exists() if "/" in path else path in names
            if not found:
                missing.append(f"{where}: {path}")
    assert not missing, missing


def test_named_modules_exist(rendered: tuple[Path, str]) -> None:
    project = rendered[0]
    missing = []
    for where, text in texts(rendered).items():
        for module in MODULE.findall(text):
            module = module.rstrip(".").replace("<package>", PACKAGE)
            local = project / "src" / Path(*module.split("."))
            generated = local.with_suffix(".py").is_file() or (local / "__init__.py").is_file()
            if not generated and importlib.util.find_spec(module.split(".")[0]) is None:
                missing.append(f"{where}: python -m {module}")
    assert not missing, missing


def test_named_metaprotocol_subcommands_exist(rendered: tuple[Path, str]) -> None:
    unknown = [
        f"{where}: metaprotocol {word}"
        for where, text in texts(rendered).items()
        for word in SUBCOMMAND.findall(text)
        if word not in _COMMANDS
    ]
    assert not unknown, unknown


@pytest.fixture(scope="module")
def rendered_filter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A package from ``metaprotocol new --filter`` and what the command printed."""
    tmp = tmp_path_factory.mktemp("render-filter")
    made = run(
        [PYTHON, "-m", "metaprotocol_sdk", "new", "--filter", "acme", "--no-input", "-o", tmp],
        env=isolated_env(tmp),
    )
    return tmp / "metaprotocol-filter-acme", made.stdout


def test_serving_commands_are_said_to_run_side_by_side(rendered: tuple[Path, str]) -> None:
    """The example server and the engine serve until Ctrl-C: the README and the next steps say
    so right before the first of them, not after a user's first command never returns."""
    _said_side_by_side(texts(rendered), PACKAGE)


def test_a_filter_package_says_so_too(rendered_filter: tuple[Path, str]) -> None:
    _said_side_by_side(texts(rendered_filter), "metaprotocol_filter_acme")


def _said_side_by_side(found: dict[str, str], package: str) -> None:
    for where in ("README.md", "(printed by metaprotocol new)"):
        text = found[where]
        first = text.index(f"{package}.example_server --port 9100")
        assert "in three terminals" in text[max(0, first - 200) : first].lower(), where


def test_readme_split_uses_the_mesh_host_and_sums_to_100(rendered: tuple[Path, str]) -> None:
    project, _ = rendered
    readme = (project / "README.md").read_text("utf-8")
    (fragment,) = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    route = yaml.safe_load(fragment)["route"]
    mesh = list(yaml.safe_load_all((project / "deploy" / "mesh.yaml").read_text("utf-8")))
    (host,) = next(doc for doc in mesh if doc["kind"] == "ServiceEntry")["spec"]["hosts"]
    assert {r["destination"]["host"] for r in route} == {host}
    assert sum(r["weight"] for r in route) == 100
