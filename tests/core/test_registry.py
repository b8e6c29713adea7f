"""Codec registry: entry points, aliases, unknown names and broken codecs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from metaprotocol_sdk import CodecLoadError, UnknownCodecError
from metaprotocol_sdk.examples.kv import KVCodec
from metaprotocol_sdk.registry import available, create_codec, load_codec, resolve


def install_fake_distribution(root: Path, name: str, entry_points: dict[str, str]) -> None:
    """Write a real (minimal) installed distribution that importlib.metadata will find."""
    dist = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[metaprotocol.codecs]\n{lines}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for module in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[module]


def test_installed_codec_is_found_by_aeraki_name_and_alias(site: Path) -> None:
    (site / "fake_kv.py").write_text("from metaprotocol_sdk.examples.kv import KVCodec\n")
    install_fake_distribution(
        site,
        "fake-kv-codec",
        {"aeraki.meta_protocol.codec.fakekv": "fake_kv:KVCodec", "fakekv": "fake_kv:KVCodec"},
    )
    info = resolve("fakekv")
    assert info.name == "aeraki.meta_protocol.codec.fakekv"
    assert info.aliases == ("fakekv",)
    assert (info.distribution, info.version) == ("fake-kv-codec", "1.2.3")
    assert resolve("aeraki.meta_protocol.codec.fakekv") == info
    assert load_codec("fakekv") is KVCodec
    assert create_codec("fakekv", {"max_frame_size": 5}).max_frame_size == 5
    assert info in available()


def test_unknown_name_lists_what_is_installed(site: Path) -> None:
    (site / "fake_kv.py").write_text("from metaprotocol_sdk.examples.kv import KVCodec\n")
    install_fake_distribution(site, "fake-kv-codec", {"fakekv": "fake_kv:KVCodec"})
    with pytest.raises(UnknownCodecError) as info:
        resolve("nosuch")
    assert "no codec named 'nosuch'" in str(info.value)
    assert "fakekv" in str(info.value)
    assert "did you mean" not in str(info.value)
    # A just-scaffolded codec is not registered until its package is installed.
    assert "when its package is installed (pip install -e . in a package made by " in str(
        info.value
    )


@pytest.mark.parametrize("typed", ["fake-kv", "Fake_KV", "fake_kb"])
def test_unknown_name_close_to_an_installed_one_is_suggested(site: Path, typed: str) -> None:
    (site / "fake_kv.py").write_text("from metaprotocol_sdk.examples.kv import KVCodec\n")
    install_fake_distribution(site, "fake-kv-codec", {"fake_kv": "fake_kv:KVCodec"})
    with pytest.raises(UnknownCodecError) as info:
        resolve(typed)
    assert f"no codec named {typed!r} is installed (did you mean 'fake_kv'?);" in str(info.value)


def test_codec_that_fails_to_import_names_its_distribution_and_cause(site: Path) -> None:
    (site / "fake_broken.py").write_text("raise RuntimeError('missing native library')\n")
    install_fake_distribution(site, "fake-broken-codec", {"broken": "fake_broken:Codec"})
    with pytest.raises(CodecLoadError) as info:
        load_codec("broken")
    message = str(info.value)
    assert "fake-broken-codec" in message
    assert "RuntimeError: missing native library" in message


def test_target_that_is_not_a_codec_is_refused(site: Path) -> None:
    (site / "fake_notcodec.py").write_text("class Thing:\n    pass\n")
    install_fake_distribution(site, "fake-thing", {"thing": "fake_notcodec:Thing"})
    with pytest.raises(CodecLoadError, match=r"is not a metaprotocol_sdk\.Codec subclass"):
        load_codec("thing")


def test_module_class_reference_works_without_installation() -> None:
    assert load_codec("metaprotocol_sdk.examples.kv:KVCodec") is KVCodec
    with pytest.raises(CodecLoadError, match="ModuleNotFoundError"):
        load_codec("no_such_module:Codec")
