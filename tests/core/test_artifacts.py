"""Artefacts appear under their final name only when complete: an export killed mid-write, a checkpoint on a full
disk, an evaluation killed before its manifest; one "is it done?" check (is_complete) for every step."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdzero_pl.core import artifacts
from sdzero_pl.core.artifacts import (
    MANIFEST, AtomicCheckpointIO, atomic_write, is_complete, read_manifest, staged_dir, write_manifest
)
from sdzero_pl.core.models import export_hf, load_model, load_tokenizer
from sdzero_pl.pipelines import demo

ROOT = Path(__file__).resolve().parents[2]

KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    from sdzero_pl.core.models import export_hf, load_model, load_tokenizer
    model, tokenizer = load_model(sys.argv[1], "float32"), load_tokenizer(sys.argv[1])
    def die(*args, **kwargs):  # the weights and config are written; the tokenizer would be next
        os.kill(os.getpid(), signal.SIGKILL)
    tokenizer.save_pretrained = die
    export_hf(model, tokenizer, sys.argv[2])
""")


def _export_killed(model_dir: str, target: Path) -> None:
    result = subprocess.run([sys.executable, "-c", KILLED_EXPORT, model_dir, str(target)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]  # killed by the hook, not an error of its own


def test_an_export_killed_mid_write_leaves_nothing_that_looks_finished(tiny_model_dir, tmp_path, monkeypatch):
    target = tmp_path / "run" / "hf_model"
    _export_killed(tiny_model_dir, target)
    assert not target.exists() and not is_complete(target)
    leftovers = list(target.parent.glob(".hf_model.partial-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "config.json").is_file()  # the weights were being written there
    # the demo's and the comparison's "step finished" check says no, so a rerun trains again
    calls = []
    monkeypatch.setattr(demo, "cli", calls.append)
    demo.fit(ROOT / "configs" / "demo" / "srt.yaml", target.parent, tiny_model_dir, 0, [])
    assert len(calls) == 1, "a half-written export was reused"
    # the next export completes and removes the dead writer's leftovers
    export_hf(load_model(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir), target)
    assert is_complete(target, verify=True) and not list(target.parent.glob(".hf_model.partial-*"))
    names = set(read_manifest(target)["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert AutoTokenizer.from_pretrained(target).chat_template is not None


def test_a_reexport_killed_mid_write_keeps_the_previous_complete_export(tiny_model_dir, tmp_path):
    target = tmp_path / "hf_model"
    export_hf(load_model(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir), target)
    before = read_manifest(target)
    _export_killed(tiny_model_dir, target)
    assert is_complete(target, verify=True) and read_manifest(target) == before
    assert AutoModelForCausalLM.from_pretrained(target) is not None


def test_exports_are_readable_by_other_users_whatever_the_umask(tiny_model_dir, tmp_path):
    old = os.umask(0o077)
    try:
        path = export_hf(load_model(tiny_model_dir, "float32"), load_tokenizer(tiny_model_dir), tmp_path / "m",
                         extra=lambda d: (d / "sub").mkdir() or (d / "sub" / "x.json").write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755 and stat.S_IMODE((path / "sub").stat().st_mode) == 0o755
    for file in path.rglob("*"):
        if file.is_file():
            assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
    assert "sub/x.json" in read_manifest(path)["files"]


def test_an_error_inside_a_staged_directory_leaves_the_old_one_untouched(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target, kind="test") as directory:
        (directory / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_dir(target, kind="test") as directory:
            (directory / "a.txt").write_text("new, half")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old" and is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_is_complete_needs_the_manifest_and_every_listed_file_at_its_size(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345")
    (tmp_path / "b.txt").write_text("x")
    assert not is_complete(tmp_path) and not is_complete(tmp_path / "missing")
    write_manifest(tmp_path, "test")
    assert is_complete(tmp_path, verify=True) and set(read_manifest(tmp_path)["files"]) == {"a.bin", "b.txt"}
    (tmp_path / "a.bin").write_bytes(b"1234")  # truncated
    assert not is_complete(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"12346")  # same size, other bytes: only the hash tells
    assert is_complete(tmp_path) and not is_complete(tmp_path, verify=True)
    (tmp_path / "b.txt").unlink()
    assert not is_complete(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="not a completion manifest"):
        is_complete(tmp_path)


def _disk_full_after(limit: int):
    """A ``torch.save`` that writes ``limit`` bytes and then fails as a full disk does."""
    def save(obj, handle):
        handle.write(b"\0" * limit)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_a_full_disk_leaves_no_checkpoint_under_its_final_name(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    good = tmp_path / "ckpts" / "epoch=0.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, good)
    monkeypatch.setattr(artifacts, "save_torch", _disk_full_after(1 << 20))
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "ckpts" / "epoch=1.ckpt")
    with pytest.raises(OSError, match="No space left"):  # over an existing name: the old file stays whole
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, good)
    assert sorted(p.name for p in good.parent.iterdir()) == ["epoch=0.ckpt"]
    assert torch.equal(io.load_checkpoint(good)["state_dict"]["w"], torch.ones(3))
    assert stat.S_IMODE(good.stat().st_mode) == 0o644


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = atomic_write(tmp_path / "f.json", lambda h: h.write(b"v1"))
    with pytest.raises(OSError):
        atomic_write(path, lambda handle: _disk_full_after(1)(None, handle))
    assert path.read_bytes() == b"v1" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
