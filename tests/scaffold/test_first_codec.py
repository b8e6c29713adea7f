"""The tutorial (docs/tutorial.md), step by step: scaffold, install, change the protocol, add
golden vectors, run the kit, run the codec in the engine.

The generated package is installed with pip into a fresh virtual environment (see
``scaffold_kit.fresh_venv``): the SDK comes from this checkout, the codec is found only
through the entry points of that install, and every command runs in that venv.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from scaffold_kit import PYTHON, Service, fresh_venv, isolated_env, pip_install, run

PROTOCOL = "acme_rpc"
SLUG = "acme-rpc-codec"  # a distribution and directory name with dashes
PACKAGE = "metaprotocol_acme_rpc"
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
    assert result["check"] == "golden_vectors"
    assert result["outcome"] == "failed"
    assert "FramingError" in result["reason"]

    # 4. Add golden vectors: record the example client's frames again.
    golden = run([python, "-m", f"{PACKAGE}.example_client", "--golden"], cwd=project).stdout
    vectors = yaml.safe_load(golden)["vectors"]
    assert all(v["hex"].startswith("ac01") for v in vectors if "error" not in v["expect"])
    (project / "src" / PACKAGE / "conformance" / "golden.yaml").write_text(golden, "utf-8")

    # 5. Run the kit: the package's CI script runs ruff, mypy --strict, its own tests (the
    #    kit's pytest suite among them) and `metaprotocol check`.
    report = tmp_path / "conformance.json"
    ci_env = {**env, "PYTHON": str(python)}
    ci = run([project / "ci.sh", "--conformance-json", report], cwd=project, env=ci_env)
    for gate in ("ruff check", "ruff format --check", "mypy --strict", "pytest"):
        assert f"== {gate}" in ci.stdout
    # The last gate, `metaprotocol check acme_rpc`, ends with its verdict.
    assert ci.stdout.rstrip().splitlines()[-1].startswith("PASSED (")
    results = json.loads(report.read_text(encoding="utf-8"))
    assert results["passed"] is True
    outcomes = {r["check"]: r["outcome"] for r in results["results"]}
    assert outcomes["golden_vectors"] == "passed"
    assert outcomes["mutation_visible"] == "passed"
    assert outcomes["heartbeat_reply"] == "passed"
    assert outcomes["rewrite_request_id"] == "passed"
    # Skipped: the capabilities the scaffold leaves undeclared (streams, and peek_reply, the
    # optional forwarding shortcut).
    skipped = {"streaming_marked", "peek_reply_agrees"}
    assert {c for c, o in outcomes.items() if o != "passed"} == skipped

    # 6. Run it in the engine: example server <- engine <- example client.
    run_in_engine(python, project, tmp_path, env)


def run_in_engine(python: Path, project: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """Route a request from the example client through the engine to the example server.

    The example configs are used as generated except for addresses: the server and the
    engine bind port 0 (a free port) and the ServiceEntry endpoint points at the server.
    """
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
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
        settings = yaml.safe_load((project / "deploy" / "proxy.yaml").read_text("utf-8"))
        for listener in settings["spec"]["listeners"]:
            listener["bind"] = "127.0.0.1:0"
        settings["spec"]["admin"]["bind"] = "127.0.0.1:0"
        proxy_yaml = tmp_path / "proxy.yaml"
        proxy_yaml.write_text(yaml.safe_dump(settings), encoding="utf-8")

        engine = Service(
            [python, "-m", "metaprotocol_sdk", "proxy", "-c", mesh, "-c", proxy_yaml],
            cwd=project,
            env=env,
        )
        services.append(engine)
        listening = engine.wait_for(r"^listening (\S+):9000 on 127\.0\.0\.1:(\d+)$")
        assert listening.group(1) == entry["spec"]["hosts"][0]
        proxy_port = listening.group(2)

        client = run(
            [
                *(python, "-m", f"{PACKAGE}.example_client", "--port", proxy_port),
                *("--header", "tenant=blue", "--ping", "--count", "2"),
            ],
            cwd=project,
            timeout=30,
        )
        replies = [json.loads(line) for line in client.stdout.splitlines()]
        beats = [r for r in replies if r["message_type"] == "Heartbeat"]
        responses = sorted(
            (r for r in replies if r["message_type"] == "Response"), key=lambda r: r["request_id"]
        )
        assert len(beats) == 1, replies  # answered by the engine itself
        assert [r["request_id"] for r in responses] == [1, 2], replies
        for reply in responses:
            assert reply["status"] == "Ok"
            assert reply["body"] == "hello"
            # Echoed by the server: the request arrived with the route's request mutation.
            assert reply["attributes"]["x-routed-by"] == "metaprotocol-engine"
            assert reply["attributes"]["tenant"] == "blue"
            assert reply["attributes"]["served-by"] == "example_server"
            # Added by the engine to the response.
            assert reply["attributes"]["x-route"] == "say-hello"

        # The server saw the mutation itself (it prints what it received).
        for _ in range(2):
            seen = json.loads(server.wait_for(r'^\{"request_id"').string)
            assert seen["method"] == "sayHello"
            assert seen["attributes"]["x-routed-by"] == "metaprotocol-engine"
    finally:
        for service in reversed(services):
            service.stop()
