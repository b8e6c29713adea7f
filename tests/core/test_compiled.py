"""The compiled (mypyc) build and the pure one: which is installed, and that both say so.

``./dev test`` runs this file in the pure venv and, with ``METAPROTOCOL_EXPECT_COMPILED=1``, in
the venv of the compiled wheels (.venv-compiled): there every module each ``setup.py`` lists
must be the compiled one, so that the tests run there test compiled code.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import sys
import tomllib
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import cast

import metaprotocol_dubbo
import metaprotocol_thrift
import pytest
from click.testing import CliRunner
from metaprotocol_dubbo import DubboCodec
from metaprotocol_thrift import ThriftCodec

from metaprotocol_sdk import ConfigError, compiled
from metaprotocol_sdk.cli import main
from metaprotocol_sdk.testing.checks._support import raised_at

ROOT = Path(__file__).resolve().parents[2]
EXPECT_COMPILED = os.environ.get("METAPROTOCOL_EXPECT_COMPILED") == "1"


def _assigned(setup: Path, name: str) -> list[str]:
    """The list a ``setup.py`` assigns to ``name``."""
    tree = ast.parse(setup.read_text())
    return next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name
    )


def _listed(setup: Path, source_root: str, package: str) -> tuple[str, ...]:
    """The module names a ``setup.py``'s ``COMPILED`` list names."""
    paths = _assigned(setup, "COMPILED")
    names = [p.removeprefix(source_root).removesuffix(".py").replace("/", ".") for p in paths]
    assert all(n.startswith(package + ".") for n in names)
    return tuple(sorted(names))


def test_compiled_lists_the_extension_modules_of_a_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "fake_compiled_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "plain.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / f"fast{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    (package / "sub" / f"faster{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert compiled("fake_compiled_pkg") == (
        "fake_compiled_pkg.fast",
        "fake_compiled_pkg.sub.faster",
    )
    assert compiled("no_such_package_here") == ()
    sys.modules.pop("fake_compiled_pkg", None)


def test_the_installed_build_is_the_expected_one() -> None:
    expected = {
        "metaprotocol_sdk": _listed(ROOT / "setup.py", "", "metaprotocol_sdk"),
        "metaprotocol_dubbo": _listed(ROOT / "codecs/dubbo/setup.py", "src/", "metaprotocol_dubbo"),
        "metaprotocol_thrift": _listed(
            ROOT / "codecs/thrift/setup.py", "src/", "metaprotocol_thrift"
        ),
    }
    found = {
        "metaprotocol_sdk": compiled(),
        "metaprotocol_dubbo": metaprotocol_dubbo.COMPILED,
        "metaprotocol_thrift": metaprotocol_thrift.COMPILED,
    }
    if EXPECT_COMPILED:
        assert found == expected
    else:
        assert found == dict.fromkeys(expected, ())


def test_codecs_json_shows_what_is_compiled() -> None:
    result = CliRunner().invoke(main, ["codecs", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert listed["sdk"]["compiled"] == list(compiled())
    rows = {name: row for row in listed["codecs"] for name in [row["name"], *row["aliases"]]}
    assert rows["dubbo"]["compiled"] == list(metaprotocol_dubbo.COMPILED)
    assert rows["thrift"]["compiled"] == list(metaprotocol_thrift.COMPILED)


@pytest.mark.parametrize("codec", [DubboCodec, ThriftCodec])
def test_an_unknown_option_is_the_same_error_in_either_build(codec: type[DubboCodec]) -> None:
    # A compiled class has no signature to check the keys against: its declared option_names
    # word the same error, naming the key and what is accepted.
    with pytest.raises(ConfigError) as caught:
        codec.from_options({"nope": 1})
    accepted = ", ".join(sorted(codec.option_names))
    assert caught.value.field == "nope"
    assert f"unknown option for codec {codec.protocol}; accepted: {accepted}" in str(caught.value)


@pytest.mark.parametrize("codec", [DubboCodec, ThriftCodec])
def test_declared_option_names_are_the_signatures(codec: type[DubboCodec]) -> None:
    if EXPECT_COMPILED:
        pytest.skip("a compiled class has no signature to compare with (the pure run does)")
    params = inspect.signature(codec).parameters
    keywords = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert sorted(codec.option_names) == sorted(keywords)


def test_the_compiled_builds_pin_mypy_as_the_dev_extra_does() -> None:
    with (ROOT / "pyproject.toml").open("rb") as file:
        dev = tomllib.load(file)["project"]["optional-dependencies"]["dev"]
    for setup in [ROOT / "setup.py", *ROOT.glob("codecs/*/setup.py")]:
        for pin in _assigned(setup, "MYPYC_REQUIRES"):
            assert pin in dev, f"{setup}: {pin} is not the dev extra's pin"


@pytest.mark.parametrize("codec", [DubboCodec, ThriftCodec])
def test_a_stray_exception_is_placed_in_the_codecs_package_in_either_build(
    codec: type[DubboCodec],
) -> None:
    # The kit's raised_at: compiled frames name the build's path (src/metaprotocol_dubbo/...),
    # a path relative to no directory the kit knows; it names them from the package on.
    instance = codec()
    with pytest.raises(TypeError) as caught:
        instance.decode(cast(bytearray, None))
    where = raised_at(caught.value, instance)
    assert where.startswith(f" (raised at {codec.__module__.replace('.', '/')}.py:"), where
    assert " in decode" in where, where
    assert where.endswith(", in compiled code)") == EXPECT_COMPILED, where
