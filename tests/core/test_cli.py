"""The ``metaprotocol`` CLI: codecs and decode."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from metaprotocol_sdk.cli import main
from metaprotocol_sdk.demo.procs import live_children
from metaprotocol_sdk.examples.kv import (
    ONEWAY,
    REQUEST,
    RESPONSE,
    STREAM_DATA,
    STREAM_OPEN,
    build_frame,
)

KV = "metaprotocol_sdk.examples.kv:KVCodec"
STREAM = (
    build_frame(REQUEST, 1, {"method": "sayHello", "interface": "demo.Greeter"}, b"body")
    + build_frame(RESPONSE, 1, {"status": "ok"}, b"hi")
    + build_frame(ONEWAY, 2, {"method": "log"})
)


def run(*args: str, stdin: bytes | str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


SUBCOMMANDS = ("check", "codecs", "decode", "demo", "new", "proxy")
CLI_PAGE = Path(__file__).parents[2] / "docs" / "cli.md"


def test_help_everywhere() -> None:
    assert main.list_commands(click.Context(main)) == list(SUBCOMMANDS)
    for args in ([], *([name] for name in SUBCOMMANDS)):
        code, out, _ = run(*args, "--help")
        assert code == 0 and "Usage:" in out
        assert "``" not in out, out  # click prints reST markup as typed
    # --golden replaces what the codec ships (it said "Golden YAML file." and nothing else).
    check_help = " ".join(run("check", "--help")[1].split())
    assert (
        "--golden FILE Golden YAML file, in place of the golden*.yaml the codec ships" in check_help
    )


def test_the_cli_page_names_every_option_as_help_shows_it() -> None:
    """docs/cli.md's section of a subcommand names each option its ``--help`` lists, by each
    of its names, with the same placeholder (``--drain SECONDS``, ``-o``'s ``KEY=VALUE``)."""
    page = CLI_PAGE.read_text(encoding="utf-8")
    sections = {
        m[1]: m[0] for m in re.finditer(r"^## `metaprotocol (\w+).*\n(?:(?!## ).*\n)*", page, re.M)
    }
    assert "`metaprotocol --version`" in page
    missing: list[str] = []
    for name in SUBCOMMANDS:
        command = main.get_command(click.Context(main), name)
        assert command is not None
        shown: list[str] = []
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            shown += param.opts + param.secondary_opts
            if not param.is_flag and not isinstance(param.type, click.Choice):
                shown.append(f"{param.opts[-1]} {param.make_metavar(click.Context(command))}")
        missing += [f"{name} {text}" for text in shown if text not in sections[name]]
    assert not missing, f"not in docs/cli.md as --help shows them: {missing}"


def test_decode_hex_json_prints_one_object_per_message() -> None:
    spaced = " ".join(STREAM.hex()[i : i + 8] for i in range(0, len(STREAM) * 2, 8))
    code, out, _ = run("decode", KV, "--hex", "--json", stdin=spaced + "\n")
    assert code == 0
    objects = [json.loads(line) for line in out.splitlines()]
    assert [o["message_type"] for o in objects] == ["Request", "Response", "Oneway"]
    first = objects[0]
    assert first["request_id"] == 1 and first["offset"] == 0
    assert first["attributes"] == {"method": "sayHello", "interface": "demo.Greeter"}
    assert first["header_size"] + first["body_size"] == first["size"]
    assert objects[1]["offset"] == first["size"]


def test_decode_raw_file_prints_a_table(tmp_path: Path) -> None:
    capture = tmp_path / "capture.bin"
    capture.write_bytes(STREAM)
    code, out, _ = run("decode", KV, str(capture))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["#", "OFFSET", "TYPE", "ID"]
    assert "sayHello" in lines[2] and "interface=demo.Greeter" in lines[2]
    assert len(lines) == 5


def test_decode_table_shows_stream_ids_when_frames_have_them() -> None:
    # Which stream a frame is of is what a streaming capture is read for; without a stream
    # the table keeps its columns.
    frames = (
        build_frame(STREAM_OPEN, 7, {"method": "watch"})
        + build_frame(REQUEST, 8, {"method": "get"})
        + build_frame(STREAM_DATA, 7, {}, b"tick")
    )
    code, out, _ = run("decode", KV, "--hex", stdin=frames.hex())
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:5] == ["#", "OFFSET", "TYPE", "ID", "STREAM"]
    assert [row[2:5] for row in rows[2:]] == [
        ["Stream_Init", "7", "7"],
        ["Request", "8", "-"],
        ["Stream_Data", "7", "7"],
    ]
    code, out, _ = run("decode", KV, "--hex", stdin=STREAM.hex())
    assert "STREAM" not in out.splitlines()[0]


def test_hex_text_without_hex_flag_says_to_pass_it(tmp_path: Path) -> None:
    capture = tmp_path / "capture.hex"
    capture.write_text(STREAM.hex() + "\n", encoding="utf-8")
    code, _, err = run("decode", KV, str(capture))
    assert code == 1
    assert "malformed input" in err and "looks like hex text: pass --hex" in err
    capture.write_bytes(b"KV\x07" + bytes(13))  # raw bytes, a bad version: no hint
    code, _, err = run("decode", KV, str(capture))
    assert code == 1 and "--hex" not in err


def test_truncated_last_message_is_reported_as_incomplete() -> None:
    code, out, err = run("decode", KV, "--hex", "--json", stdin=STREAM[:-3].hex())
    assert code == 1
    assert len(out.splitlines()) == 2  # the complete messages are still printed
    assert "incomplete message" in err and "trailing bytes" in err


def test_malformed_input_gives_offset_and_non_zero_exit() -> None:
    first = len(
        build_frame(REQUEST, 1, {"method": "sayHello", "interface": "demo.Greeter"}, b"body")
    )
    bad = STREAM[:first] + b"XX" + STREAM[first + 2 :]
    code, _, err = run("decode", KV, "--hex", stdin=bad.hex())
    assert code == 1
    assert "malformed input" in err and f"at byte {first}" in err and "message 2" in err
    assert "Traceback" not in err


def test_bad_hex_and_unknown_codec_are_clear_errors() -> None:
    code, _, err = run("decode", KV, "--hex", stdin="zz")
    assert code == 2 and "not valid hex" in err
    code, _, err = run("decode", "nosuch", "--hex", stdin="00")
    assert code == 2 and "no codec named 'nosuch'" in err
    code, _, err = run("decode", KV, "-o", "bogus=1", "--hex", stdin="00")
    assert code == 2 and "unknown option" in err


def test_codecs_lists_installed_codecs_as_json() -> None:
    code, out, _ = run("codecs", "--json")
    assert code == 0
    names = {c["name"]: c for c in json.loads(out)["codecs"]}
    for protocol in ("dubbo", "thrift"):
        entry = names[f"aeraki.meta_protocol.codec.{protocol}"]
        assert entry["aliases"] == [protocol]
        assert entry["distribution"] == f"metaprotocol-codec-{protocol}"


@pytest.mark.parametrize("module", ["metaprotocol_sdk"])
def test_console_entry_point_runs(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "decode", KV, "--hex", "--json"],
        input=STREAM.hex(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3


# --- every command, bad input: one line naming the problem, exit 2, never a traceback -------

KV_PROXY_MESH = """\
apiVersion: metaprotocol.aeraki.io/v1alpha1
kind: ApplicationProtocol
metadata: {name: kv, namespace: istio-system}
spec: {protocol: kv, codec: metaprotocol_sdk.examples.kv:KVCodec}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: svc}
spec:
  hosts: [svc.test]
  ports: [{number: 9000, name: tcp-metaprotocol-kv-svc, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {tcp-metaprotocol-kv-svc: 1}}]
"""

#: What each named file holds (written fresh for every row); ``huge`` is sparse, 65 MiB.
FILES: dict[str, bytes] = {
    "non-utf8": b"codec: kv\nvectors: []\n# caf\xe9\n",
    "binary": b"\x7fELF\x02\x01\x01\x00\x00\x00\x00",
    "empty": b"",
    "nested": b"[" * 5000,
    "bad-hex": b"codec: kv\nvectors: [{name: v, hex: 'abc', expect: {}}]\n",
    "mesh-only": KV_PROXY_MESH.encode(),
    "hex-odd": b"0a0b0",
    "hex-letters": b"0a zz",
}
HUGE = 65 * 1024 * 1024

# (command line with {name} placeholders for files, what the error line must contain)
BAD_INPUT: dict[str, tuple[list[str], str]] = {
    # decode
    "decode: missing file": (["decode", KV, "{missing}"], "no such file"),
    "decode: a directory": (["decode", KV, "{dir}"], "is a directory"),
    "decode: unreadable path": (["decode", KV, "{notadir}"], "cannot be read"),
    "decode: empty file": (["decode", KV, "{empty}"], "empty input"),
    "decode: huge file": (["decode", KV, "{huge}"], "larger than the limit"),
    "decode --hex: non-UTF-8": (["decode", KV, "--hex", "{non-utf8}"], "not UTF-8 text"),
    "decode --hex: binary": (["decode", KV, "--hex", "{binary}"], "binary data"),
    "decode --hex: odd length": (["decode", KV, "--hex", "{hex-odd}"], "odd number of hex"),
    "decode --hex: not hex": (["decode", KV, "--hex", "{hex-letters}"], "not hex: 'z'"),
    "decode: unknown codec": (["decode", "nosuch", "{hex-odd}"], "no codec named 'nosuch'"),
    "decode: not a codec": (["decode", "os:path", "{hex-odd}"], "'os:path' is not a"),
    "decode: unknown option": (["decode", KV, "-o", "bogus=1", "{hex-odd}"], "bogus: unknown"),
    "decode: option syntax": (["decode", KV, "-o", "bogus", "{hex-odd}"], "expected KEY=VALUE"),
    "decode: unknown flag": (["decode", KV, "--bogus"], "No such option '--bogus'"),
    "decode: no codec": (["decode"], "Missing argument 'CODEC'"),
    # check
    "check: missing golden": (["check", KV, "--golden", "{missing}"], "does not exist"),
    "check: golden is a directory": (["check", KV, "--golden", "{dir}"], "is a directory"),
    "check: golden non-UTF-8": (["check", KV, "--golden", "{non-utf8}"], "not UTF-8 text"),
    "check: golden binary": (["check", KV, "--golden", "{binary}"], "binary data"),
    "check: golden empty": (["check", KV, "--golden", "{empty}"], "a golden file is a mapping"),
    "check: golden nested": (["check", KV, "--golden", "{nested}"], "nested deeper than"),
    "check: golden huge": (["check", KV, "--golden", "{huge}"], "larger than the limit"),
    "check: golden bad hex": (["check", KV, "--golden", "{bad-hex}"], "odd number of hex"),
    "check: known failures non-UTF-8": (
        ["check", KV, "--known-failures", "{non-utf8}"],
        "not UTF-8 text",
    ),
    "check: known failures nested": (
        ["check", KV, "--known-failures", "{nested}"],
        "nested deeper than",
    ),
    "check: known failures binary": (["check", KV, "--known-failures", "{binary}"], "binary"),
    "check: unknown codec": (["check", "nosuch"], "no codec named 'nosuch'"),
    "check: unknown option": (["check", KV, "-o", "bogus=1"], "bogus: unknown option"),
    "check: option of the wrong type": (
        ["check", KV, "-o", "max_frame_size=abc"],
        "max_frame_size: must be a positive integer (bytes), got 'abc'",
    ),
    "check: unknown check": (["check", KV, "--only", "bogus"], "unknown checks ['bogus']"),
    # proxy (the file rows depend on the configuration loader's own checks)
    "proxy: missing file": (["proxy", "-c", "{missing}"], "{missing}"),
    "proxy: a directory": (["proxy", "-c", "{dir}"], "is a directory"),
    "proxy: non-UTF-8": (["proxy", "-c", "{non-utf8}"], "UTF-8"),
    "proxy: binary": (["proxy", "-c", "{binary}"], "binary"),
    "proxy: nested": (["proxy", "-c", "{nested}"], "nested"),
    "proxy: huge": (["proxy", "-c", "{huge}"], "larger than"),
    "proxy: empty file": (["proxy", "-c", "{empty}"], "no resources"),
    "proxy --check: empty file": (["proxy", "--check", "-c", "{empty}"], "no resources"),
    "proxy: no ProxyConfig": (["proxy", "-c", "{mesh-only}"], "no listeners"),
    "proxy --check: no ProxyConfig": (["proxy", "--check", "-c", "{mesh-only}"], "no listeners"),
    "proxy: no file": (["proxy"], "Missing option '-c' / '--config'"),
    # new
    "new: template missing": (["new", "acme", "--template", "{missing}"], "not a template"),
    "new: bad -x": (["new", "acme", "--no-input", "-x", "nokey"], "expected KEY=VALUE"),
    "new: bad licence": (["new", "acme", "--license", "GPL"], "'GPL' is not one of"),
    "new: output is a file": (["new", "acme", "--no-input", "-o", "{empty}"], "is a file"),
    "new: no terminal, no --no-input": (
        ["new", "acme", "-o", "{out}"],
        "standard input is not a terminal; pass --no-input",
    ),
    "new: directory exists": (
        ["new", "acme", "--no-input", "-o", "{taken}"],
        "{taken}/metaprotocol-codec-acme already exists; nothing was generated: remove it, or "
        "choose another place (-o DIR) or directory name (-x project_slug=NAME)",
    ),
    "new: bad answer": (
        ["new", "class", "--no-input", "-o", "{out}"],
        "the answers were rejected",
    ),
    # codecs, demo, the group itself
    "codecs: unknown flag": (["codecs", "--bogus"], "No such option '--bogus'"),
    "demo: unknown protocol": (["demo", "--protocol", "smtp"], "'smtp' is not one of"),
    "demo: zero duration": (["demo", "--duration", "0"], "0"),
    "unknown command": (["frobnicate"], "No such command 'frobnicate'"),
}


def _files(tmp_path: Path) -> dict[str, str]:
    paths = {"missing": str(tmp_path / "missing.yaml"), "dir": str(tmp_path)}
    for name, content in FILES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(content)
        paths[name] = str(path)
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as file:
        file.truncate(HUGE)  # sparse: no disk, still read as zeros
    paths["huge"] = str(huge)
    paths["notadir"] = str(tmp_path / "empty.yaml" / "child")
    out = tmp_path / "out"
    out.mkdir()
    paths["out"] = str(out)
    taken = tmp_path / "taken"
    (taken / "metaprotocol-codec-acme").mkdir(parents=True)
    paths["taken"] = str(taken)
    return paths


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gives_one_line_and_exit_2(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template, expected = BAD_INPUT[case]
    paths = _files(tmp_path)
    args = [a.format(**paths) for a in template]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COOKIECUTTER_CONFIG", str(_cookiecutter_config(tmp_path)))
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert result.exit_code == 2, output
    # Exactly one error line (the configuration's warnings, if any, come before it).
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    (line,) = lines or [""]
    assert line.startswith("error: "), result.stderr
    assert expected.format(**paths) in line, result.stderr


def _cookiecutter_config(tmp_path: Path) -> Path:
    config = tmp_path / "cookiecutter-config.yaml"
    config.write_text(
        f"cookiecutters_dir: {tmp_path / 'cc'}\nreplay_dir: {tmp_path / 'replay'}\n", "utf-8"
    )
    return config


def test_an_internal_error_is_one_line_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("planted\nbug")

    monkeypatch.setattr("metaprotocol_sdk.cli.codecs.available", broken)
    result = CliRunner().invoke(main, ["codecs"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: internal error (RuntimeError: planted bug); this is a bug, please report it "
        "(METAPROTOCOL_TRACEBACK=1 shows the traceback)"
    ]


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_bytes(b"[" * 5000)
    proc = subprocess.run(
        [sys.executable, "-m", "metaprotocol_sdk", "check", KV, "--golden", str(nested)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {nested}: nested deeper than 64 levels (line 1)"
    ], proc.stderr


def test_engine_refuses_a_configuration_without_listeners() -> None:
    import asyncio

    from metaprotocol_sdk.errors import ConfigError
    from metaprotocol_sdk.proxy import Engine, loads_config

    engine = Engine(loads_config(KV_PROXY_MESH, "mesh.yaml"))
    with pytest.raises(ConfigError, match="no listeners"):
        asyncio.run(engine.start())


def test_every_subcommand_writes_log_records_with_their_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not only ``proxy``: what a codec or the SDK logs while ``codecs`` runs says its level
    (``warning:``, like the CLI's ``error:`` lines), and the program's logging is put back."""
    import logging

    def listing() -> list[object]:
        logging.getLogger("metaprotocol.registry").warning("planted\nsecond line")
        logging.getLogger("metaprotocol.registry").debug("not at the default level")
        return []

    monkeypatch.setattr("metaprotocol_sdk.cli.codecs.available", listing)
    root = logging.getLogger()
    before = root.handlers[:], root.level
    result = CliRunner().invoke(main, ["codecs", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "warning: planted\n  second line\n"
    assert (root.handlers, root.level) == before


def test_demo_without_thriftpy2_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # From the wheels alone (no dev extras), each Thrift server child died with a traceback
    # ending in "ModuleNotFoundError: No module named 'thriftpy2'".
    import metaprotocol_sdk.demo.run as demo_run

    monkeypatch.setattr(demo_run, "find_spec", lambda name: None, raising=False)
    code, out, err = run("demo", "--protocol", "thrift", "--duration", "1")
    assert code == 1
    assert err.startswith("error: thriftpy2 is not installed:"), err
    assert "`pip install thriftpy2`" in err and "Traceback" not in err + out
    assert live_children() == []


def test_getting_started_decode_example_prints_what_the_page_shows() -> None:
    # The page's command pipes a golden vector's hex, over several shell lines, into decode.
    sys.path.insert(0, str(Path(__file__).parents[1] / "scaffold"))
    from doc_output import DOCS, assert_shown

    page = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    command = page.split("<!-- output: decode -->", 1)[1].split("| metaprotocol decode", 1)[0]
    hex_text = " ".join(command.replace("\\\n", " ").split()[3:])  # after "```console $ echo"
    code, out, err = run("decode", "dubbo", "--hex", stdin=hex_text)
    assert code == 0, err
    assert_shown("getting-started.md", "decode", out)


def test_a_codec_that_fails_in_its_own_code_is_named_not_called_an_internal_error(
    tmp_path: Path,
) -> None:
    """A codec whose constructor raises (``check``, ``decode``) or whose ``decode`` raises
    something other than ``CodecError``: the CLI said "internal error ... this is a bug,
    please report it" of the SDK. It names the codec, what raised, and the line."""
    (tmp_path / "faulty_codecs.py").write_text(
        "from metaprotocol_sdk.examples.kv import KVCodec\n"
        "class NoTable(KVCodec):\n"
        "    def __init__(self, **options):\n"
        "        raise RuntimeError('no table')\n"
        "class BadDecode(KVCodec):\n"
        "    def decode(self, buffer):\n"
        "        raise KeyError('length')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    cases = [
        (["check", "faulty_codecs:NoTable"], b"", 2, "building it raised RuntimeError: no table"),
        (["decode", "faulty_codecs:NoTable", "-"], b"x", 2, "building it raised RuntimeError"),
        (["decode", "faulty_codecs:BadDecode", "-"], b"x", 1, "decode raised KeyError: 'length'"),
    ]
    for args, stdin, code, words in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "metaprotocol_sdk", *args],
            input=stdin,
            capture_output=True,
            timeout=120,
            env=env,
        )
        (line,) = proc.stderr.decode().splitlines()
        assert proc.returncode == code, line
        assert line.startswith(f"error: codec {args[1]}: ") and words in line, line
        assert "faulty_codecs.py:" in line and "internal error" not in line, line


def test_a_codec_error_quoting_megabytes_is_one_short_line(tmp_path: Path) -> None:
    """A codec's exception may quote what it was given (a hostile capture): the CLI's line
    about it keeps at most about a thousand characters of it, its middle cut."""
    (tmp_path / "quoting_codecs.py").write_text(
        "from metaprotocol_sdk.examples.kv import KVCodec\n"
        "class Quoting(KVCodec):\n"
        "    def decode(self, buffer):\n"
        "        raise ValueError('bad byte in ' + 'x' * 1_000_000)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "metaprotocol_sdk", "decode", "quoting_codecs:Quoting", "-"],
        input=b"x",
        capture_output=True,
        timeout=120,
        env=env,
    )
    (line,) = proc.stderr.decode().splitlines()
    assert proc.returncode == 1 and "decode raised ValueError: bad byte in xxx" in line
    assert len(line) < 2000 and "characters cut" in line, len(line)
