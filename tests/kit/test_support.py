"""Building blocks of the checks: guarded decode, time bound, length-field search, hex dumps."""

from __future__ import annotations

import operator
import struct
import sys
import types
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from metaprotocol_sdk import NEED_DATA, CodecError, Metadata, NeedData
from metaprotocol_sdk.examples.kv import REQUEST, KVCodec, build_frame
from metaprotocol_sdk.testing import CodecTarget, KitSettings, Outcome, run_check
from metaprotocol_sdk.testing.checks import CheckFailed
from metaprotocol_sdk.testing.checks._support import call_decode, split_points
from metaprotocol_sdk.testing.checks.bad_input import length_fields
from metaprotocol_sdk.testing.hexdump import compare, hexdump

FRAME = build_frame(REQUEST, 9, {"method": "get"}, b"0123456789")


class HangsOnGarbage(KVCodec):
    """Spins forever when the magic is wrong (a parser loop that never advances)."""

    conformance = "metaprotocol_sdk.examples.kv_conformance"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        if len(buffer) >= 2 and buffer[:2] != b"KV":
            while True:
                pass
        return super().decode(buffer)


class AsksForTooMuch(KVCodec):
    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        return NeedData(self.max_frame_size + 1)


class AlwaysNeedsData(KVCodec):
    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        return NEED_DATA


class NibblesOnNeedData(KVCodec):
    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        del buffer[:1]
        return NEED_DATA


def test_a_decode_that_never_returns_is_stopped_and_reported() -> None:
    settings = KitSettings(time_limit=0.05, examples=3, random_examples=5)
    target = CodecTarget.discover(HangsOnGarbage, settings=settings)
    result = run_check(target, "bad_input_corrupted")
    assert result.outcome is Outcome.failed
    assert "decode took longer than 0.05s" in result.reason


def test_call_decode_enforces_the_need_data_rules() -> None:
    with pytest.raises(CheckFailed, match="buffering an oversized length"):
        call_decode(AsksForTooMuch(max_frame_size=100), bytearray(b"KV"))
    with pytest.raises(CheckFailed, match="changed the buffer"):
        call_decode(NibblesOnNeedData(), bytearray(b"KV"))
    with pytest.raises(CheckFailed, match="at or above max_frame_size"):
        call_decode(AlwaysNeedsData(max_frame_size=4), bytearray(FRAME[:4]))
    assert isinstance(call_decode(KVCodec(), bytearray(FRAME[:20])), NeedData)


class RaisesInItsHelper(KVCodec):
    """A stray exception two calls deep in the codec's own code."""

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        return self._by_kind(buffer)

    def _by_kind(self, buffer: bytearray) -> Metadata | NeedData:
        return {0: KVCodec.decode}[buffer[3]](self, buffer)  # KeyError for other kinds


def test_a_stray_exception_is_reported_with_the_codec_line_that_raised_it() -> None:
    # The author is told which line of theirs to change, not only the exception's text.
    with pytest.raises(CheckFailed) as failed:
        call_decode(RaisesInItsHelper(), bytearray(build_frame(REQUEST + 1, 1, {}, b"")))
    assert "decode raised KeyError: 1 (raised at " in str(failed.value)
    assert "test_support.py:" in str(failed.value)
    assert "in _by_kind: return {0: KVCodec.decode}[buffer[3]](self, buffer)" in str(failed.value)


def test_the_codec_line_is_found_when_another_package_has_its_top_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A suite that imported another project's ``tests`` package (a scaffolded codec's, say)
    # holds it under the name this module's top package has: the codec's own directory comes
    # from its module's file, not from whatever sys.modules holds under that name.
    top = RaisesInItsHelper.__module__.partition(".")[0]
    shadow = types.ModuleType(top)
    shadow.__path__ = ["/elsewhere/" + top]
    monkeypatch.setitem(sys.modules, top, shadow)
    with pytest.raises(CheckFailed) as failed:
        call_decode(RaisesInItsHelper(), bytearray(build_frame(REQUEST + 1, 1, {}, b"")))
    assert "in _by_kind: return {0: KVCodec.decode}[buffer[3]](self, buffer)" in str(failed.value)
    assert "compiled" not in str(failed.value)


def test_a_stray_exception_in_a_library_names_the_codec_line_that_called_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import metaprotocol_sdk.examples.kv as kv

    class Header:
        def unpack(self, buffer: bytearray) -> None:
            raise struct.error("a library's own failure")

    monkeypatch.setattr(kv, "HEADER", Header())
    with pytest.raises(CheckFailed) as failed:
        call_decode(KVCodec(), bytearray(FRAME))
    assert "(raised at metaprotocol_sdk/examples/kv.py:" in str(failed.value)
    assert " in decode: " in str(failed.value)


class DecodesInC(KVCodec):
    """Its decode is C code (a builtin): no Python frame of the codec's own in a traceback,
    as with a C extension or a compiled codec whose compiler adds none."""

    decode = operator.itemgetter(99)  # type: ignore[assignment]


def test_a_stray_exception_without_a_codec_frame_names_the_codec_not_the_kits_line() -> None:
    with pytest.raises(CheckFailed) as failed:
        call_decode(DecodesInC(), bytearray(b"KV"))
    message = str(failed.value)
    assert "decode raised IndexError: bytearray index out of range (raised in C code that " in (
        message
    )
    assert f"DecodesInC of {__name__} called: no Python frame says which line)" in message
    assert "_support.py" not in message and "call_decode" not in message, message


#: A codec as mypyc compiles it: its source, and the path its build was given.
COMPILED_SOURCE = """\
from metaprotocol_sdk.examples.kv import KVCodec


def helper(buffer):
    return {0: KVCodec.decode}[buffer[3]]


class Codec(KVCodec):
    def decode(self, buffer):
        return helper(buffer)(self, buffer)


class InC(KVCodec):
    decode = __import__("operator").itemgetter(99)
"""


def _compiled_codec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """``fake_mypyc_codec.codec`` as a compiled install holds it: the module is an extension
    (``codec.cpython-...so``, its source shipped beside it), and its frames in a traceback
    name ``src/fake_mypyc_codec/codec.py``, the path given to mypyc, as mypyc 2.4.1 does.
    The current directory holds another file at that path, which must not be quoted."""
    package = tmp_path / "site" / "fake_mypyc_codec"
    package.mkdir(parents=True)
    (package / "codec.py").write_text(COMPILED_SOURCE)
    decoy = tmp_path / "src" / "fake_mypyc_codec"
    decoy.mkdir(parents=True)
    (decoy / "codec.py").write_text("DECOY = 'another file'\n" * 20)
    monkeypatch.chdir(tmp_path)
    top = types.ModuleType("fake_mypyc_codec")
    top.__path__ = [str(package)]
    module = types.ModuleType("fake_mypyc_codec.codec")
    module.__file__ = str(package / f"codec{EXTENSION_SUFFIXES[0]}")
    monkeypatch.setitem(sys.modules, top.__name__, top)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(COMPILED_SOURCE, "src/fake_mypyc_codec/codec.py", "exec"), vars(module))
    return module


def test_a_compiled_codecs_line_is_named_from_its_package_without_a_source_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = _compiled_codec(tmp_path, monkeypatch).Codec()
    with pytest.raises(CheckFailed) as failed:
        call_decode(codec, bytearray(build_frame(REQUEST + 1, 1, {}, b"")))
    message = str(failed.value)
    assert (
        "decode raised KeyError: 1 (raised at fake_mypyc_codec/codec.py:5 in helper, "
        "in compiled code)"
    ) in message, message
    assert "DECOY" not in message and "src/" not in message, message


def test_a_compiled_codec_without_frames_is_named_by_its_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = _compiled_codec(tmp_path, monkeypatch).InC()
    with pytest.raises(CheckFailed) as failed:
        call_decode(codec, bytearray(b"KV"))
    message = str(failed.value)
    assert (
        "decode raised IndexError: bytearray index out of range (raised in the compiled "
        "module fake_mypyc_codec.codec: no Python frame says which line)"
    ) in message, message


def test_length_field_search_finds_the_kv_body_length() -> None:
    metadata = KVCodec().decode(bytearray(FRAME))
    assert isinstance(metadata, Metadata)
    assert (12, 4, "big") in length_fields(FRAME, metadata)


def test_split_points_cover_short_frames_fully_and_sample_long_ones() -> None:
    assert split_points(5, 600) == [1, 2, 3, 4]
    points = split_points(10_000, 600)
    assert len(points) < 700 and points[0] == 1 and points[-1] == 9_999


def test_hexdump_shows_offsets_and_marks_the_byte() -> None:
    dump = hexdump(bytes(range(20)), mark=17)
    assert "00000010  10 11 12 13" in dump and "^^ offset 17" in dump
    assert "differ at offset 2" in compare(b"abc", b"abd")


def test_the_pytest_plugin_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, metaprotocol_sdk.testing.plugin; "
        "print('hypothesis' in sys.modules, 'metaprotocol_sdk.testing.checks' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


class ClaimsTooLargeFrameSize(KVCodec):
    """Raises with a frame_size beyond the buffer: an engine would drop bytes not yet read."""

    conformance = "metaprotocol_sdk.examples.kv_conformance"

    def decode(self, buffer: bytearray) -> Metadata | NeedData:
        try:
            return super().decode(buffer)
        except CodecError as exc:
            exc.frame_size = len(buffer) + 5
            raise


def test_consumes_nothing_also_bounds_an_errors_frame_size() -> None:
    result = run_check(CodecTarget.discover(ClaimsTooLargeFrameSize), "bad_input_consumes_nothing")
    assert result.outcome is Outcome.failed
    assert "frame_size must count bytes that are there" in result.reason
