"""The tutorial (docs/tutorial.md), step by step: scaffold, install, change the protocol, add
golden vectors, run the kit, run the codec in the engine.

The generated package is installed with pip into a fresh virtual environment (see
``scaffold_kit.fresh_venv``): the SDK comes from this checkout, the codec is found only
through the entry points of that install, and every command runs in that venv. Every output
the page shows is compared with what the command printed here (``doc_output``), so the page
cannot drift. (``tests/packaging`` runs the same first hour from the built wheels.)
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from doc_output import DOCS, assert_shown, shown_excerpts, shown_tree
from scaffold_kit import PYTHON, fresh_venv, isolated_env, pip_install, run, run_in_engine

PROTOCOL = "acme_rpc"
SLUG = "acme-rpc-codec"  # a distribution and directory name with dashes
PACKAGE = "metaprotocol_acme_rpc"
PAGE = "tutorial.md"
AUTHOR = "Zoë Ångström-Łukasiewicz"
NEW_MAGIC = 'MAGIC = b"\\xac\\x01"'


def test_first_codec_from_scaffold_to_engine(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)

    # 1. Scaffold, with non-default answers.
    made = run(
        [
            *(PYTHON, "-m", "metaprotocol_sdk", "new", PROTOCOL, "--no-input"),
            *("--output-dir", tmp_path, "--author", AUTHOR, "--license", "MIT"),
            *("-x", f"project_slug={SLUG}", "-x", "description=Codec for the Acme RPC protocol"),
        ],
        env=env,
    )
    project = tmp_path / SLUG
    assert f"created {project}" in made.stdout
    assert_shown(PAGE, "new", made.stdout.replace(str(tmp_path), "/home/you"))
    generated = {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()}
    assert sorted(shown_tree(PAGE, "tree")) == sorted(generated)
    excerpts = shown_excerpts(PAGE)
    assert len(excerpts) == 4
    for path, excerpt in excerpts:
        assert excerpt in (project / path).read_text("utf-8"), f"{path} no longer has:\n{excerpt}"
    pyproject = (project / "pyproject.toml").read_text(encoding="utf-8")
    assert f'name = "{AUTHOR}"' in pyproject
    assert 'license = "MIT"' in pyproject

    # 2. Install it into a fresh venv: the entry points make it an installed codec.
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, project, env)
    listed = json.loads(run([python, "-m", "metaprotocol_sdk", "codecs", "--json"]).stdout)
    mine = [c for c in listed["codecs"] if c["distribution"] == SLUG]
    assert len(mine) == 1, listed
    assert mine[0]["name"] == f"aeraki.meta_protocol.codec.{PROTOCOL}"
    assert mine[0]["aliases"] == [PROTOCOL]
    shown = run([python, "-m", "metaprotocol_sdk", "codecs"]).stdout
    assert_shown(PAGE, "codecs", shown)
    # ... and only there: the checkout's own environment does not see it.
    theirs = json.loads(run([PYTHON, "-m", "metaprotocol_sdk", "codecs", "--json"]).stdout)
    assert SLUG not in {c["distribution"] for c in theirs["codecs"]}

    # 3. Change the protocol (the tutorial's change: the magic number). The shipped golden
    #    vectors no longer decode, and the kit says so.
    protocol_py = project / "src" / PACKAGE / "protocol.py"
    source = protocol_py.read_text(encoding="utf-8")
    assert 'MAGIC = b"\\xc0\\xde"' in source
    protocol_py.write_text(source.replace('MAGIC = b"\\xc0\\xde"', NEW_MAGIC), encoding="utf-8")
    stale = run(
        [python, "-m", "metaprotocol_sdk", "check", PROTOCOL, "--only", "golden_vectors", "--json"],
        cwd=project,
        expect=1,
    )
    (result,) = json.loads(stale.stdout)["results"]
    stale_text = run(
        [python, "-m", "metaprotocol_sdk", "check", PROTOCOL, "--only", "golden_vectors"],
        cwd=project,
        expect=1,
    )
    assert_shown(PAGE, "check-stale", stale_text.stdout)
    assert result["check"] == "golden_vectors"
    assert result["outcome"] == "failed"
    assert "FramingError" in result["reason"]

    # 4. Add golden vectors: record the example client's frames again.
    golden = run([python, "-m", f"{PACKAGE}.example_client", "--golden"], cwd=project).stdout
    vectors = yaml.safe_load(golden)["vectors"]
    assert all(v["hex"].startswith("ac01") for v in vectors if "error" not in v["expect"])
    (project / "src" / PACKAGE / "conformance" / "golden.yaml").write_text(golden, "utf-8")
    assert_shown(PAGE, "golden", golden)
    request = next(v["hex"] for v in vectors if v["name"] == "request sayHello")
    assert f"$ echo {request} " in (DOCS / PAGE).read_text("utf-8")  # the page decodes it
    decoded = run([python, "-m", "metaprotocol_sdk", "decode", PROTOCOL, "--hex"], input=request)
    assert_shown(PAGE, "decode", decoded.stdout)

    # 5. Run the kit: the package's CI script runs ruff, mypy --strict, its own tests (the
    #    kit's pytest suite among them) and `metaprotocol check`.
    report = tmp_path / "conformance.json"
    ci_env = {**env, "PYTHON": str(python)}
    ci = run([project / "ci.sh", "--conformance-json", report], cwd=project, env=ci_env)
    for gate in ("ruff check", "ruff format --check", "mypy --strict", "pytest"):
        assert f"== {gate}" in ci.stdout
    # The last gate, `metaprotocol check acme_rpc`, ends with its verdict.
    assert ci.stdout.rstrip().splitlines()[-1].startswith("PASSED (")
    assert_shown(PAGE, "ci", ci.stdout)
    results = json.loads(report.read_text(encoding="utf-8"))
    assert results["passed"] is True
    outcomes = {r["check"]: r["outcome"] for r in results["results"]}
    assert outcomes["golden_vectors"] == "passed"
    assert outcomes["mutation_visible"] == "passed"
    assert outcomes["heartbeat_reply"] == "passed"
    assert outcomes["rewrite_request_id"] == "passed"
    # Skipped: the capabilities the scaffold leaves undeclared (streams, peek_reply, the
    # optional forwarding shortcut, and the drain notice and the ping, which its codec shows
    # in comments: all their checks), and identity on unusual frames (it ships no
    # unusual_messages strategy).
    skipped = {
        "streaming_marked",
        "streaming_ids",
        "peek_reply_agrees",
        "peek_reply_large",
        "drain_notice_heartbeat",
        "drain_notice_stateless",
        "drain_notice_only_notices",
        "drain_notice_needs_heartbeat",
        "drain_notice_declared",
        "heartbeat_request_heartbeat",
        "heartbeat_request_answered",
        "heartbeat_request_stateless",
        "heartbeat_request_needs_heartbeat",
        "heartbeat_request_declared",
        "roundtrip_identity_unusual",
    }
    assert {c for c, o in outcomes.items() if o != "passed"} == skipped

    # 6. Run it in the engine: example server <- engine <- example client.
    outputs = run_in_engine(python, project, PACKAGE, tmp_path, env)
    # The page shows the configured ports; the test bound free ones.
    server_port, proxy_port, admin_port = outputs["ports"].split()
    for name in ("server", "engine", "client", "server-received"):
        text = outputs[name]
        for real, shown in ((server_port, "9100"), (proxy_port, "9000"), (admin_port, "9901")):
            text = text.replace(f"127.0.0.1:{real}", f"127.0.0.1:{shown}")
        assert_shown(PAGE, name, text)
