"""Artefacts that appear under their final name only when complete: files, directories, Lightning checkpoints.

A run killed at any instant (kill -9, a node lost, a full disk) must never leave something that looks finished:
a rerun of the demo or the comparison would reuse it. The rules, after Orbax's ``AtomicRenameTemporaryPath`` (a
temporary sibling renamed into place once every file is written) and Megatron-LM's tracker file (a step counts
only once its record is written, after everything else):

* a file is written to a temporary sibling (``.<name>.partial-<pid>-<random>``), flushed, ``fsync``-ed, given mode
  0644, renamed over the final name (``os.replace``: atomic on POSIX within one filesystem), and the directory
  entry is ``fsync``-ed (:func:`atomic_write`);
* a directory (an HF export) is built in a temporary sibling directory that ends with a manifest
  (:data:`MANIFEST`: every file with its size and sha256), every file and the directory are ``fsync``-ed, files
  get mode 0644 and directories 0755, then it is renamed into place; an existing directory of that name is moved
  aside first and deleted after (:func:`staged_dir`);
* "is it done?" is one question everywhere, :func:`is_complete`: the manifest exists and every file it lists is
  there with its size (``verify=True`` also checks the sha256);
* Lightning checkpoints go through :class:`AtomicCheckpointIO` (the same rules for ``.ckpt`` files; Lightning's
  own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file sits in ``/tmp``, so the
  final move is a copy across filesystems that a full disk leaves truncated under the final name, and it holds
  the whole checkpoint in memory twice). Distributed (sharded) checkpoints are written by
  ``torch.distributed.checkpoint``, whose ``.metadata`` file is written last and is its own completion record.

One writer per path: a temporary sibling left by a killed writer is deleted by the next write to the same path
(when the process that made it no longer runs on this machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

MANIFEST = "sdzero_manifest.json"
FORMAT_VERSION = 1
FILE_MODE, DIR_MODE = 0o644, 0o755  # exports are read by other users (a shared model directory, vLLM servers)


# --------------------------------------------------------------------------------------------------- files
def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")


def _stale_partials(path: Path) -> list[Path]:
    """Temporary siblings of ``path`` whose writer no longer runs here (killed mid-write)."""
    stale = []
    for candidate in path.parent.glob(f".{path.name}.partial-*"):
        pid = candidate.name.rsplit(".partial-", 1)[1].split("-")[0]
        if not pid.isdigit() or not _alive(int(pid)):
            stale.append(candidate)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a file through ``write(handle)`` so that ``path`` holds either its old content or the complete new one:
    temporary sibling, flush, fsync, mode 0644, rename, fsync of the directory. If ``write`` raises (a full disk),
    the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_partials(path):
        _remove(stale)
    tmp = _partial_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=indent) + "\n")


# --------------------------------------------------------------------------------------------- manifests
def sha256_of(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_entries(directory: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of ``names`` (default: every file under ``directory``)."""
    directory = Path(directory)
    if names is None:
        names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                       if p.is_file() and p.name != MANIFEST)
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
            for name in names}


def write_manifest(directory: str | os.PathLike, kind: str, names: list[str] | None = None, sync: bool = True) -> Path:
    """Record ``directory`` as complete: the manifest lists ``names`` (default every file) with size and sha256. It
    is written atomically and LAST, after the files it lists were made durable (``sync=False``: the caller syncs
    them itself, as :func:`staged_dir` does before publishing); :func:`is_complete` reads it."""
    directory = Path(directory)
    entries = manifest_entries(directory, names)
    for name in entries if sync else ():
        _fsync_file(directory / name)
    return atomic_write_json(directory / MANIFEST, {"format": FORMAT_VERSION, "kind": kind, "files": entries})


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of ``directory``, or None when it has none (never finished, or not written by this project)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT_VERSION or not isinstance(data.get("files"), dict):
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT_VERSION}")
    except ValueError as error:
        raise ValueError(f"{path}: not a completion manifest ({error})") from error
    return data


def is_complete(directory: str | os.PathLike, verify: bool = False) -> bool:
    """THE "is it done?" check of every step that produces a directory (an HF export, an evaluation): its manifest
    exists and every file it lists is present with the recorded size (``verify``: and the recorded sha256)."""
    directory = Path(directory)
    manifest = read_manifest(directory) if directory.is_dir() else None
    if manifest is None:
        return False
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
        if verify and sha256_of(path) != entry["sha256"]:
            return False
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- directories
@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Build a directory that appears at ``path`` only when complete::

        with staged_dir("runs/x/hf_model", kind="hf_model") as tmp:
            model.save_pretrained(tmp)     # anything written under tmp
        # here: runs/x/hf_model holds every file and its manifest, or (on any error) is as it was before

    On success the manifest is written last, every file and directory is fsync-ed and given mode 0644 / 0755,
    the old ``path`` (if any) is moved aside and the new one renamed into place. On an exception the temporary
    directory is deleted and ``path`` is left as it was. A kill -9 leaves only the temporary sibling, which the
    next export to ``path`` deletes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_partials(path):
        _remove(stale)
    tmp = _partial_name(path)
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp, kind, sync=False)  # _publish fsyncs every file, the manifest included
        _publish(tmp)
        old = None
        if path.exists() or path.is_symlink():
            old = _partial_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def _publish(directory: Path) -> None:
    """Readable by other users and durable: 0644 files, 0755 directories, each fsync-ed."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            file = Path(root) / name
            os.chmod(file, FILE_MODE)
            _fsync_file(file)
        for name in dirs:
            os.chmod(Path(root) / name, DIR_MODE)
        fsync_dir(Path(root))
    os.chmod(directory, DIR_MODE)


# --------------------------------------------------------------------------------------------- checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, except that a ``.ckpt`` appears under its final name only when complete:
    ``torch.save`` streams into a temporary sibling in the same directory (no second copy in memory), which is
    fsync-ed, given mode 0644 and renamed into place (:func:`atomic_write`). A full disk or a kill leaves the
    previous checkpoints untouched and no partial file under any checkpoint name. Remote (fsspec URL) paths are
    left to Lightning's writer (object stores publish whole objects)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_write(path, lambda handle: save_torch(checkpoint, handle))


def save_torch(obj: Any, handle: IO[bytes]) -> None:
    """``torch.save`` into an open file (a module-level name: tests replace it by a writer that fills the disk)."""
    import torch

    torch.save(obj, handle)


def use_atomic_checkpoints(trainer) -> None:
    """Give the trainer's strategy an :class:`AtomicCheckpointIO` when it would use Lightning's default writer (a
    CheckpointIO the user configured, e.g. an async or cloud one, is kept). Every training module calls this in
    ``setup``, before anything is saved."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if type(current) is TorchCheckpointIO:  # exactly the default, not a subclass the user chose
        strategy.checkpoint_io = AtomicCheckpointIO()
