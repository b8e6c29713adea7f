"""The template's hooks reject bad answers with a clear message and leave nothing behind;
``metaprotocol new`` prompts by default and reports rejected answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from cookiecutter.exceptions import FailedHookException  # type: ignore[import-untyped]
from cookiecutter.main import cookiecutter  # type: ignore[import-untyped]
from scaffold_kit import PYTHON, TEMPLATE, isolated_env, run

BAD_ANSWERS = {
    "dash": ({"protocol_name": "acme-rpc"}, "protocol_name: 'acme-rpc' is not a valid protocol"),
    "not an identifier": ({"protocol_name": "9lives"}, "protocol_name: '9lives' is not a valid"),
    "keyword": ({"protocol_name": "class"}, "'class' is a Python keyword"),
    "reserved protocol": ({"protocol_name": "dubbo"}, "protocol_name: 'dubbo' is reserved"),
    "empty protocol": ({"protocol_name": ""}, "protocol_name: must not be empty"),
    "sdk package": ({"package_name": "metaprotocol_sdk"}, "'metaprotocol_sdk' is reserved"),
    "test package": ({"package_name": "test"}, "package_name: 'test' is reserved"),
    "stdlib package": ({"package_name": "json"}, "would shadow the standard library"),
    "package with dash": ({"package_name": "my-codec"}, "'my-codec' is not a valid Python"),
    "empty author": ({"author": ""}, "author: must not be empty"),
    "quote in author": ({"author": 'Dwayne "The Rock"'}, "must not contain"),
    "bad e-mail": ({"author_email": "nobody"}, "'nobody' is not an e-mail address"),
    "bad slug": ({"project_slug": "-codec-"}, "project_slug: '-codec-' is not a valid"),
    "too long": ({"protocol_name": "p" * 25}, "protocol_name: at most 24 characters"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
def test_bad_answer_is_rejected_and_nothing_is_left(
    tmp_path: Path, case: str, capfd: pytest.CaptureFixture[str]
) -> None:
    answers, message = BAD_ANSWERS[case]
    out = tmp_path / "out"
    out.mkdir()
    isolated_env(tmp_path)  # writes the config that keeps replay files out of $HOME
    with pytest.raises(FailedHookException):
        cookiecutter(
            str(TEMPLATE),
            no_input=True,
            extra_context=answers,
            output_dir=str(out),
            config_file=str(tmp_path / "cookiecutter-config.yaml"),
        )
    stderr = capfd.readouterr().err  # the hook is a subprocess: capture at the fd level
    assert "error: cannot generate the codec package:" in stderr
    assert message in stderr
    assert list(out.iterdir()) == [], "a rejected answer left output behind"


def test_every_problem_is_reported_at_once_by_metaprotocol_new(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = run(
        [
            *(PYTHON, "-m", "metaprotocol_sdk", "new", "class", "--no-input", "-o", out),
            *("--package", "json", "--author", ""),
        ],
        env=isolated_env(tmp_path),
        expect=2,
    )
    for message in ("'class' is a Python keyword", "'json' would shadow", "author: must not"):
        assert message in proc.stderr
    assert "error: the answers were rejected; nothing was generated" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


def test_metaprotocol_new_prompts_by_default(tmp_path: Path) -> None:
    # Answers in prompt order; an empty line keeps the default shown in the prompt.
    answers = ["zeta_rpc", "", "", "", "José Núñez", "jose@example.com", "2", "", "n", "", "", "y"]
    proc = run(
        [PYTHON, "-m", "metaprotocol_sdk", "new", "-o", tmp_path / "out"],
        env=isolated_env(tmp_path),
        input="\n".join(answers) + "\n",
    )
    project = tmp_path / "out" / "metaprotocol-codec-zeta-rpc"
    assert f"created {project}" in proc.stdout
    pyproject = (project / "pyproject.toml").read_text(encoding="utf-8")
    assert 'authors = [{ name = "José Núñez", email = "jose@example.com" }]' in pyproject
    assert 'license = "MIT"' in pyproject
    codec = (project / "src" / "metaprotocol_zeta_rpc" / "codec.py").read_text(encoding="utf-8")
    assert "class ZetaRpcCodec(Codec):" in codec
    assert "heartbeat=False," in codec
    assert "oneway=True," in codec
    assert "streaming=True," in codec


def test_author_defaults_to_the_git_identity(tmp_path: Path) -> None:
    # Not "Your Name <you@example.com>" in the package metadata and LICENSE of a user whose
    # git knows who they are; an explicit --author wins, and a name the template refuses
    # (a quote) falls back to the template's default instead of failing.
    env = isolated_env(tmp_path)
    gitconfig = tmp_path / "gitconfig"
    env.update(GIT_CONFIG_GLOBAL=str(gitconfig), GIT_CONFIG_NOSYSTEM="1")
    gitconfig.write_text("[user]\n\tname = Ada Lovelace\n\temail = ada@example.org\n")
    command = [PYTHON, "-m", "metaprotocol_sdk", "new", "--no-input", "-o", tmp_path]
    run([*command, "first"], env=env)
    pyproject = tmp_path / "metaprotocol-codec-first" / "pyproject.toml"
    authors = 'authors = [{ name = "Ada Lovelace", email = "ada@example.org" }]'
    assert authors in pyproject.read_text(encoding="utf-8")
    run([*command, "second", "--author", "Grace Hopper"], env=env)
    pyproject = tmp_path / "metaprotocol-codec-second" / "pyproject.toml"
    authors = 'authors = [{ name = "Grace Hopper", email = "ada@example.org" }]'
    assert authors in pyproject.read_text(encoding="utf-8")
    gitconfig.write_text('[user]\n\tname = Dwayne \\"The Rock\\"\n\temail = nobody\n')
    run([*command, "third"], env=env)
    pyproject = tmp_path / "metaprotocol-codec-third" / "pyproject.toml"
    authors = 'authors = [{ name = "Your Name", email = "you@example.com" }]'
    assert authors in pyproject.read_text(encoding="utf-8")


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    command = [PYTHON, "-m", "metaprotocol_sdk", "new", "acme", "--no-input", "-o", tmp_path]
    run(command, env=env)
    marker = tmp_path / "metaprotocol-codec-acme" / "README.md"
    marker.write_text("mine", encoding="utf-8")
    proc = run(command, env=env, expect=2)
    assert "already exists" in proc.stderr
    assert marker.read_text(encoding="utf-8") == "mine"


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pre_gen", TEMPLATE / "hooks/pre_gen_project.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protocol_of_another_installed_codec_is_rejected() -> None:
    hook = _hook()
    answers = {
        "protocol_name": "acme",
        "project_slug": "acme-codec",
        "package_name": "acme_codec",
        "description": "d",
        "author": "a",
        "author_email": "a@example.com",
        "version": "0.1.0",
        "license": "MIT",
        "heartbeat": True,
        "oneway": True,
        "rewrite_request_id": True,
        "streaming": False,
        "__codec_class": "AcmeCodec",
    }
    assert hook.validate(answers, {}) == []
    # Re-generating over one's own installed codec is fine; another distribution's is not.
    assert hook.validate(answers, {"acme": "acme_codec"}) == []
    (problem,) = hook.validate(answers, {"acme": "other-acme"})
    assert "already installed by 'other-acme'" in problem


def test_an_invalid_name_is_refused_before_the_questions_and_the_directory_check(
    tmp_path: Path,
) -> None:
    # 'ledger-rpc' gives the same directory as an earlier 'ledger_rpc': cookiecutter said
    # "already exists" first, and without --no-input all twelve questions came before the
    # refusal of the name given on the command line.
    (tmp_path / "metaprotocol-codec-ledger-rpc").mkdir()
    proc = run(
        [PYTHON, "-m", "metaprotocol_sdk", "new", "Ledger-RPC", "-o", tmp_path],
        env=isolated_env(tmp_path),
        expect=2,
        input="",
    )
    assert proc.stderr.splitlines() == [
        "error: cannot generate the codec package:",
        "  - protocol_name: 'Ledger-RPC' is not a valid protocol name; use lowercase letters, "
        "digits and '_', starting with a letter (no '-': ServiceEntry port names "
        "tcp-metaprotocol-<protocol>-<name> use it as the separator), e.g. 'ledger_rpc'",
        "error: the answers were rejected; nothing was generated",
    ]
    assert proc.stdout == ""
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["cookiecutter-config.yaml", "metaprotocol-codec-ledger-rpc"]
