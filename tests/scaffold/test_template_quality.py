"""What the template generates is lint-clean, formatted and passes ``mypy --strict``.

Two renders with plain ``cookiecutter`` (no SDK command involved) cover both sides of every
template conditional: every capability on with the longest accepted names, and every
capability off.
"""

from __future__ import annotations

import os
import socket
import stat
import tomllib
from pathlib import Path

import pytest
import yaml
from scaffold_kit import BIN, PYTHON, REPO, TEMPLATE, isolated_env, run

VARIANTS = {
    "everything-longest-names": {
        "protocol_name": "legacy_billing_gateway_2",  # 24 characters, the longest accepted
        "package_name": "acme_legacy_billing_gateway_codec_v2_pkg",  # 40, the longest
        "description": "D" * 72,
        "heartbeat": "yes",
        "oneway": "yes",
        "rewrite_request_id": "yes",
        "streaming": "yes",
        "license": "BSD-3-Clause",
    },
    "no-capabilities": {
        "protocol_name": "tiny",
        "heartbeat": "no",
        "oneway": "no",
        "rewrite_request_id": "no",
        "streaming": "no",
        "license": "Proprietary",
    },
}


def render(tmp_path: Path, answers: dict[str, str]) -> Path:
    out = tmp_path / "out"
    args = [f"{key}={value}" for key, value in answers.items()]
    run(
        [BIN / "cookiecutter", "--no-input", "-o", out, TEMPLATE, *args], env=isolated_env(tmp_path)
    )
    (project,) = out.iterdir()
    return project


def sdk_source_env() -> dict[str, str]:
    # The checkout's SDK is an editable install (an import-hook finder), which mypy cannot
    # follow; the generated ci.sh points MYPYPATH at the source the same way.
    return {**os.environ, "MYPYPATH": str(REPO)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generated_package_is_clean(tmp_path: Path, variant: str) -> None:
    answers = VARIANTS[variant]
    project = render(tmp_path, answers)
    package = answers.get("package_name", f"metaprotocol_{answers['protocol_name']}")

    for path in project.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert "{{" not in text and "{%" not in text, f"unrendered Jinja in {path}"
    assert (project / ".github" / "workflows" / "ci.yml").is_file()
    assert os.stat(project / "ci.sh").st_mode & stat.S_IXUSR

    run([PYTHON, "-m", "ruff", "check", "--no-cache", "."], cwd=project)
    run([PYTHON, "-m", "ruff", "format", "--check", "--no-cache", "."], cwd=project)
    mypy = [PYTHON, "-m", "mypy", "--strict", "--no-incremental", "src", "tests"]
    run(mypy, cwd=project, env=sdk_source_env())

    meta = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    entry_points = meta["project"]["entry-points"]["metaprotocol.codecs"]
    protocol = answers["protocol_name"]
    target = entry_points[f"aeraki.meta_protocol.codec.{protocol}"]
    assert entry_points == {f"aeraki.meta_protocol.codec.{protocol}": target, protocol: target}
    assert target.startswith(f"{package}:")

    # The shipped golden vectors are exactly the frames the example client sends.
    golden = run(
        [PYTHON, "-m", f"{package}.example_client", "--golden"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project / "src")},
    ).stdout
    shipped = project / "src" / package / "conformance" / "golden.yaml"
    assert shipped.read_text(encoding="utf-8") == golden
    kinds = {v["expect"].get("message_type") for v in yaml.safe_load(golden)["vectors"]}
    assert ("Heartbeat" in kinds) is (answers["heartbeat"] == "yes")
    assert ("Oneway" in kinds) is (answers["oneway"] == "yes")
    streams = {"Stream_Init", "Stream_Data", "Stream_Close_One_Way", "Stream_Close_Two_Way"}
    assert (streams <= kinds) is (answers["streaming"] == "yes")
    assert (project / "tests" / "test_engine.py").is_file() is (answers["streaming"] == "yes")
    codec = (project / "src" / package / "codec.py").read_text(encoding="utf-8")
    for flag in ("heartbeat", "oneway", "rewrite_request_id"):
        assert f"{flag}={answers[flag] == 'yes'}," in codec
    assert ("streaming=True," in codec) is (answers["streaming"] == "yes")

    # A server that accepts and never answers: the client says what it waited for, and where.
    streaming = answers["streaming"] == "yes"
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        client = [PYTHON, "-m", f"{package}.example_client", "--port", port, "--timeout", "0.2"]
        env = {**os.environ, "PYTHONPATH": str(project / "src")}
        timed_out = run(client, cwd=project, env=env, expect=1)
        stream_timed_out = run([*client, "--stream"], cwd=project, env=env, expect=None)
    assert timed_out.stderr == (
        f"error: TimeoutError: 0 of 1 replies from 127.0.0.1:{port} within 0.2 s\n"
    )
    assert stream_timed_out.returncode == (1 if streaming else 2)  # 2: no --stream option
    assert ("stream 1 did not end within 0.2 s" in stream_timed_out.stderr) is streaming


@pytest.mark.parametrize("kind", ["codec", "filter"])
def test_ci_sh_outside_the_environment_says_what_to_install(tmp_path: Path, kind: str) -> None:
    # Run from a new terminal, without the venv, ci.sh failed on its first line with
    # "No module named ruff": the author installed ruff globally and got the next error.
    name = {"codec": "protocol_name", "filter": "filter_name"}[kind]
    template = REPO / "metaprotocol_sdk" / "cli" / f"{kind}_template"
    out = tmp_path / "out"
    run(
        [BIN / "cookiecutter", "--no-input", "-o", out, template, f"{name}=tiny"],
        env=isolated_env(tmp_path),
    )
    (project,) = out.iterdir()
    package = "metaprotocol_tiny" if kind == "codec" else "metaprotocol_filter_tiny"
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec "{PYTHON}" -I -S "$@"\n', encoding="utf-8")
    bare.chmod(0o755)
    proc = run(["bash", project / "ci.sh"], env={**os.environ, "PYTHON": str(bare)}, expect=2)
    assert f"lacks metaprotocol_sdk {package} ruff mypy pytest" in proc.stderr
    assert "pip install -e .[dev]" in proc.stderr and "== ruff" not in proc.stdout
    # The SDK and the tools are there, the package itself is not installed yet.
    env = {**os.environ, "PYTHON": PYTHON, "PYTHONPATH": str(REPO)}
    proc = run(["bash", project / "ci.sh"], env=env, expect=2)
    assert f"lacks {package}: activate" in proc.stderr
    # No python at all (a new terminal without the venv on a machine that has only python3).
    nowhere = {**os.environ, "PYTHON": "no-such-python"}
    proc = run(["bash", project / "ci.sh"], env=nowhere, expect=2)
    assert "error: cannot run no-such-python: activate the environment" in proc.stderr


@pytest.mark.parametrize("kind", ["codec", "filter"])
def test_the_example_client_says_when_nothing_listens(tmp_path: Path, kind: str) -> None:
    # Started before the engine, the client printed only "ConnectionRefusedError: [Errno 111]
    # Connect call failed ('127.0.0.1', 9000)".
    name = {"codec": "protocol_name", "filter": "filter_name"}[kind]
    template = REPO / "metaprotocol_sdk" / "cli" / f"{kind}_template"
    out = tmp_path / "out"
    run(
        [BIN / "cookiecutter", "--no-input", "-o", out, template, f"{name}=tiny"],
        env=isolated_env(tmp_path),
    )
    (project,) = out.iterdir()
    package = "metaprotocol_tiny" if kind == "codec" else "metaprotocol_filter_tiny"
    with socket.create_server(("127.0.0.1", 0)) as gone:
        port = gone.getsockname()[1]
    client = [PYTHON, "-m", f"{package}.example_client", "--port", port]
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    refused = run(client, cwd=project, env=env, expect=1)
    assert f"nothing listens on 127.0.0.1:{port}: start the engine" in refused.stderr
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
