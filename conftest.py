"""Settings for the whole suite (this file is found for every test path under the checkout).

Hypothesis runs derandomized (a fixed seed per test) and without its example database, as the
conformance kit's own runs are: a CI run and a local run try the same inputs, a failure
reproduces from the test's name alone, and no ``.hypothesis/`` folder is left behind. Set
``HYPOTHESIS_PROFILE=explore`` to search new inputs (random seeds, still no database).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
from hypothesis import settings

# ``peer_check`` (what a test does when a real peer is missing) for every test module.
sys.path.insert(0, str(Path(__file__).parent / "tests"))

settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


#: What :func:`pytest_collection_finish` found, by the file of the test module concerned: its
#: tests fail with it (a collection error raised there is lost under pytest-xdist).
_SECOND_COPIES: dict[str, str] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Find a module made up for the engine to import by name (``sys.modules["x"] =
    module``) whose classes come from a second copy of a test module. pytest (importlib mode)
    names a test module after its package path (``tests.proxy.test_x``); a test module that
    imports it by file name (``from test_x import ...``) makes another copy, which runs the
    registration again with classes of its own: the engine then loads a class the tests never
    set up (a filter's events, a codec's switches), and a test waits for good. The tests of
    such a module fail, saying so."""
    ran = {m.__file__: m.__name__ for m in _test_modules(session) if m.__file__}
    for name, module in list(sys.modules.items()):
        if not isinstance(module, types.ModuleType) or module.__spec__ is not None:
            continue  # an imported module (made-up ones have no spec)
        for attr, value in list(vars(module).items()):
            owner = sys.modules.get(getattr(value, "__module__", None) or "")
            file = getattr(owner, "__file__", None)
            if owner is not None and file in ran and owner.__name__ != ran[file]:
                _SECOND_COPIES[file] = (
                    f"{name}.{attr} comes from {owner.__name__}, a second copy of "
                    f"{ran[file]} (a test module imported it by file name): name the class by "
                    "its own module, f'{__name__}:Class', or move it to a helper module"
                )


def pytest_runtest_setup(item: pytest.Item) -> None:
    module = getattr(item, "module", None)
    found = _SECOND_COPIES.get(getattr(module, "__file__", None) or "")
    if found is not None:
        pytest.fail(found, pytrace=False)


def _test_modules(session: pytest.Session) -> set[types.ModuleType]:
    modules = set()
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None:
            modules.add(module)
    return modules
