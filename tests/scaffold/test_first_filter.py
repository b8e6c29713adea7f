"""``metaprotocol new --filter``: scaffold a filter package, install it, run its own gates, and
route requests through it in the engine, found only by its entry-point name.

The package is installed with pip (not editable) into a throwaway virtual environment (see
``scaffold_kit.fresh_venv``): the SDK comes from this checkout, the filter is known only to
that venv, and the engine runs there. Nothing is left in the checkout's own environment.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from scaffold_kit import PYTHON, REPO, Service, fresh_venv, isolated_env, run

FILTER = "tenant_guard"
SLUG = "metaprotocol-filter-tenant-guard"
PACKAGE = "metaprotocol_filter_tenant_guard"
FILTER_CLASS = "TenantGuardFilter"
ENTRY_POINT = f"aeraki.meta_protocol.filters.{FILTER}"

#: What the generated README tells the user to run in the engine (ports as configured).
README_RUN = [
    f"python -m {PACKAGE}.example_server --port 9100",
    "metaprotocol proxy -c deploy/mesh.yaml -c deploy/proxy.yaml",
    f"python -m {PACKAGE}.example_client --port 9000 --header tenant=blue",
    f"python -m {PACKAGE}.example_client --port 9000",
]

_SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)


def _sh_commands(readme: str) -> list[list[str]]:
    """The commands of each ``sh`` block of a README, without their comments."""
    return [
        [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
        for block in _SH_BLOCK.findall(readme)
    ]


def _installed_filters(python: Path | str) -> dict[str, str]:
    """``{name: distribution}`` for every filter name ``python``'s environment resolves."""
    code = (
        "import json; from metaprotocol_sdk.registry import available_filters as a; "
        "print(json.dumps({n: i.distribution for i in a() for n in i.names}))"
    )
    found: dict[str, str] = json.loads(run([python, "-c", code]).stdout)
    return found


def _get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def test_first_filter_from_scaffold_to_engine(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)

    # 1. Scaffold.
    made = run(
        [PYTHON, "-m", "metaprotocol_sdk", "new", "--filter", FILTER, "--no-input", "-o", tmp_path],
        env=env,
    )
    project = tmp_path / SLUG
    assert f"created {project}" in made.stdout
    meta = tomllib.loads((project / "pyproject.toml").read_text("utf-8"))
    target = f"{PACKAGE}:{FILTER_CLASS}"
    assert meta["project"]["entry-points"]["metaprotocol.filters"] == {
        ENTRY_POINT: target,
        FILTER: target,
    }
    for path in project.rglob("*"):
        if path.is_file():
            text = path.read_text("utf-8")
            assert "{{" not in text and "{%" not in text, f"unrendered Jinja in {path}"
    # The README names exactly the commands run below, and the next steps printed agree.
    readme = (project / "README.md").read_text("utf-8")
    develop, engine_block = _sh_commands(readme)
    assert develop == ["pip install -e '.[dev]'", "./ci.sh"]
    assert engine_block == README_RUN
    for command in README_RUN[:3]:
        assert command in made.stdout
    # ... and every file or directory it names is there.
    named = re.findall(r"`([\w./{}-]+(?:/|\.(?:py|yaml|toml|sh)|LICENSE))`", readme)
    assert "deploy/proxy.yaml" in named and f"src/{PACKAGE}/filter.py" in named, named
    assert [n for n in named if not (project / n).exists()] == []

    # 2. Install it (a real install, not editable) into a throwaway venv: only there is it
    #    an installed filter.
    python = fresh_venv(tmp_path / "venv")
    run(
        [PYTHON, "-m", "pip", "--python", python, "install", "-q", "--no-deps", project],
        env=env,
        timeout=300,
    )
    assert _installed_filters(python)[ENTRY_POINT] == SLUG
    assert _installed_filters(python)[FILTER] == SLUG
    assert ENTRY_POINT not in _installed_filters(PYTHON)

    # 3. Its own gates: ruff, ruff format, mypy --strict, its tests (on the filter harness,
    #    against the installed package), and the engine's check of the deploy files.
    ci = run([project / "ci.sh"], cwd=project, env={**env, "PYTHON": str(python)}, timeout=300)
    for gate in ("ruff check", "ruff format --check", "mypy --strict", "pytest"):
        assert f"== {gate}" in ci.stdout
    assert re.search(r"^\d+ passed", ci.stdout, re.M), ci.stdout
    assert "== metaprotocol proxy --check" in ci.stdout

    # 4. The engine, from the generated deploy files with free ports, filters requests.
    _route_through_the_engine(python, project, tmp_path, env)


def _route_through_the_engine(python: Path, project: Path, tmp: Path, env: dict[str, str]) -> None:
    services: list[Service] = []
    try:
        server = Service(
            [python, "-m", f"{PACKAGE}.example_server", "--port", "0"], cwd=project, env=env
        )
        services.append(server)
        server_port = int(server.wait_for(r"^listening on 127\.0\.0\.1:(\d+)$").group(1))

        docs = list(yaml.safe_load_all((project / "deploy" / "mesh.yaml").read_text("utf-8")))
        (entry,) = [d for d in docs if d["kind"] == "ServiceEntry"]
        (endpoint,) = entry["spec"]["endpoints"]
        (port_name,) = endpoint["ports"]
        endpoint["ports"][port_name] = server_port
        (tmp / "mesh.yaml").write_text(yaml.safe_dump_all(docs), encoding="utf-8")
        settings = yaml.safe_load((project / "deploy" / "proxy.yaml").read_text("utf-8"))
        (listener,) = settings["spec"]["listeners"]
        assert listener["filters"] == [
            {"name": ENTRY_POINT, "config": {"attribute": "tenant", "allowed": ["blue", "green"]}}
        ]
        listener["bind"] = "127.0.0.1:0"
        settings["spec"]["admin"]["bind"] = "127.0.0.1:0"
        (tmp / "proxy.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")

        mesh, proxy = tmp / "mesh.yaml", tmp / "proxy.yaml"
        engine = Service(
            [python, "-m", "metaprotocol_sdk", "proxy", "-c", mesh, "-c", proxy],
            cwd=project,
            env=env,
        )
        services.append(engine)
        proxy_port = engine.wait_for(r"^listening \S+:9000 on 127\.0\.0\.1:(\d+)$").group(1)
        admin = int(engine.wait_for(r"^admin on 127\.0\.0\.1:(\d+)$").group(1))

        def client(*headers: str, expect: int) -> dict[str, object]:
            args = [python, "-m", f"{PACKAGE}.example_client", "--port", proxy_port]
            for header in headers:
                args += ["--header", header]
            out: dict[str, object] = json.loads(run(args, cwd=project, expect=expect).stdout)
            return out

        # Allowed: the request reaches the server with the filter's mark.
        ok = client("tenant=blue", expect=0)
        assert ok["status"] == "Ok"
        echoed = ok["attributes"]
        assert isinstance(echoed, dict)
        assert echoed["x-checked-tenant"] == "blue"
        seen = json.loads(server.wait_for(r'^\{"request_id"').string)
        assert seen["attributes"]["x-checked-tenant"] == "blue"

        # Refused by the filter: the client's codec carries the engine's BadRequest.
        for headers, message in (
            ((), "missing attribute 'tenant'"),
            (("tenant=red",), "tenant 'red' is not allowed"),
        ):
            refused = client(*headers, expect=1)
            assert refused["status"] == "Error"
            assert refused["attributes"] == {
                "error-type": "BadRequest",
                "error-message": message,
            }
        # ... and never reached the server: the next request it prints is the next allowed one.
        assert client("tenant=green", expect=0)["status"] == "Ok"
        seen = json.loads(server.wait_for(r'^\{"request_id"').string)
        assert seen["attributes"]["tenant"] == "green"

        dump = _get_json(admin, "/config_dump")
        (dumped,) = dump["listeners"]
        assert [route["chain"] for route in dumped["routes"]] == [[FILTER]]
    finally:
        for service in reversed(services):
            service.stop()

    # The alias names the same filter; without the install neither name resolves.
    alias = (tmp / "proxy.yaml").read_text("utf-8").replace(ENTRY_POINT, FILTER)
    (tmp / "alias.yaml").write_text(alias, encoding="utf-8")
    for config, name in ((tmp / "proxy.yaml", ENTRY_POINT), (tmp / "alias.yaml", FILTER)):
        check: list[str | Path] = ["proxy", "--check", "-c", tmp / "mesh.yaml", "-c", config]
        loaded = run([python, "-m", "metaprotocol_sdk", *check], cwd=project, env=env)
        assert "configuration OK" in loaded.stdout
        unknown = run([PYTHON, "-m", "metaprotocol_sdk", *check], cwd=project, env=env, expect=2)
        assert f"no filter named {name!r} is installed" in unknown.stderr


BAD_NAMES = {
    "dash": ("Tenant-Guard", "filter_name: 'Tenant-Guard' is not a valid filter name"),
    "keyword": ("class", "filter_name: 'class' is a Python keyword"),
    "reserved": ("router", "filter_name: 'router' is reserved"),
    "too long": ("f" * 25, "filter_name: at most 24 characters, got 25"),
}


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_bad_filter_name_is_refused_and_nothing_is_left(tmp_path: Path, case: str) -> None:
    name, message = BAD_NAMES[case]
    out = tmp_path / "out"
    out.mkdir()
    proc = run(
        [PYTHON, "-m", "metaprotocol_sdk", "new", "--filter", name, "--no-input", "-o", out],
        env=isolated_env(tmp_path),
        expect=2,
    )
    # One line for the problem, one saying nothing was generated; no traceback.
    problem, verdict = proc.stderr.splitlines()
    assert problem.startswith(f"error: {message}")
    assert verdict == "error: the answers were rejected; nothing was generated"
    assert list(out.iterdir()) == [], "a rejected answer left output behind"


def test_codec_options_are_refused_for_a_filter(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = run(
        [PYTHON, "-m", "metaprotocol_sdk", "new", "--filter", FILTER, "--oneway", "-o", out],
        env=isolated_env(tmp_path),
        expect=2,
    )
    assert proc.stderr == (
        "error: --oneway/--no-oneway declares a codec capability; a filter package has none\n"
    )
    assert list(out.iterdir()) == []


def test_longest_names_generate_a_clean_package(tmp_path: Path) -> None:
    """The longest accepted answers still give lint-clean, formatted code (mypy --strict runs
    on the default render, in the generated ci.sh above)."""
    out = tmp_path / "out"
    package = "acme_legacy_billing_gateway_filter_v2_pk"  # 40 characters, the longest
    run(
        [
            *(PYTHON, "-m", "metaprotocol_sdk", "new", "--filter", "legacy_billing_gateway_2"),
            *("--package", package, "--no-input", "-x", "description=" + "D" * 72),
            *("--license", "Proprietary", "-o", out),
        ],
        env=isolated_env(tmp_path),
    )
    (project,) = out.iterdir()
    run([PYTHON, "-m", "ruff", "check", "--no-cache", "."], cwd=project)
    run([PYTHON, "-m", "ruff", "format", "--check", "--no-cache", "."], cwd=project)
    assert (project / "src" / package / "py.typed").is_file()
    assert 'license = "LicenseRef-Proprietary"' in (project / "pyproject.toml").read_text("utf-8")


def test_metaprotocol_new_filter_prompts_by_default(tmp_path: Path) -> None:
    # Answers in prompt order; an empty line keeps the default shown in the prompt.
    answers = ["rate_tag", "", "", "", "José Núñez", "jose@example.com", "2", ""]
    proc = run(
        [PYTHON, "-m", "metaprotocol_sdk", "new", "--filter", "-o", tmp_path / "out"],
        env=isolated_env(tmp_path),
        input="\n".join(answers) + "\n",
    )
    project = tmp_path / "out" / "metaprotocol-filter-rate-tag"
    assert f"created {project}" in proc.stdout
    assert "Filter name" in proc.stdout
    pyproject = (project / "pyproject.toml").read_text(encoding="utf-8")
    assert 'authors = [{ name = "José Núñez", email = "jose@example.com" }]' in pyproject
    assert 'license = "MIT"' in pyproject
    source = (project / "src" / "metaprotocol_filter_rate_tag" / "filter.py").read_text("utf-8")
    assert "class RateTagFilter(Filter):" in source
    assert 'name = "rate_tag"' in source


def _hook() -> ModuleType:
    path = REPO / "metaprotocol_sdk/cli/filter_template/hooks/pre_gen_project.py"
    spec = importlib.util.spec_from_file_location("filter_pre_gen", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_name_of_another_installed_filter_is_rejected() -> None:
    hook = _hook()
    answers = {
        "filter_name": "tag",
        "project_slug": "acme-tag-filter",
        "package_name": "acme_tag_filter",
        "description": "d",
        "author": "a",
        "author_email": "a@example.com",
        "version": "0.1.0",
        "license": "MIT",
        "__filter_class": "TagFilter",
    }
    assert hook.validate(answers, {}) == []
    # Re-generating over one's own installed filter is fine; another distribution's is not.
    assert hook.validate(answers, {"tag": "acme_tag_filter"}) == []
    (problem,) = hook.validate(answers, {"tag": "other-tag"})
    assert "a filter named 'tag' is already installed by 'other-tag'" in problem
    # A bad name is reported once, not again for the package and directory derived from it.
    bad = {**answers, "filter_name": "Tag-X", "package_name": "metaprotocol_filter_Tag-X"}
    bad["project_slug"] = "metaprotocol-filter-tag-x"
    (problem,) = hook.validate(bad, {})
    assert problem.startswith("filter_name: 'Tag-X' is not a valid filter name")
